"""Weights & Biases and the run's own training-curve log (``metrics.jsonl``).

Every app logs under one vocabulary, to both (docs/wandb.md shows it in the W&B app):

=================  =========================================================================
``train/loss``     training loss; ``train/<m>`` further training numbers (``train/ppl``)
``val/loss``       validation during training; ``val/<m>`` its metrics (``val/top1``)
``test/<m>``       the final evaluation: each metric ``results.json`` records (summary only)
``lr``             learning rate
``throughput``     training items per second (images, or target tokens for fairseq)
``epoch``          the epoch, where the pipeline has epochs
=================  =========================================================================

all against ``step``, the optimiser step (W&B's own ``_step`` is set to it too, so a resumed
run that logs a step again is not a second curve). Losses, perplexities and errors keep
their minimum in the run summary, accuracies and BLEU their maximum, next to the last value.

A run's W&B id lives in the run directory: a resumed invocation continues the same run. Offline,
every invocation writes its own ``wandb/offline-run-<time>-<id>/`` folder; ``wandb sync`` of
all the folders of that id uploads them, oldest first, as one run (:func:`sync_command`). A
run that starts over (nothing to resume: :class:`~experiments.core.rundir.RunDir` has cleared
its ``metrics.jsonl``) gets a new id, as its earlier curve is superseded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.core.io import atomic_write_text, require_writable
from experiments.core.results import METRICS_LOG, RESULTS_FILE, RunResult, finite_or_null
from experiments.core.setup import normalizer_label, normalizer_options

WANDB_ID_FILE = "wandb_run_id.txt"

STEP = "step"
SPLITS = ("train", "val", "test")
PLAIN_METRICS = ("lr", "throughput", "epoch")
# A metric's last name part -> the summary W&B keeps besides the last value.
LOWER_IS_BETTER = re.compile(r"(loss|ppl|perplexity|error|zero_prob|_over_var)$")
HIGHER_IS_BETTER = re.compile(r"(top\d+|bleu|chrf|accuracy)$")
# What each split's metrics are called in the pipelines' own records (fairseq's valid_loss).
_SPLIT_ALIASES = {"train": "train", "val": "valid|val", "test": "test"}


def is_vocabulary(name: str) -> bool:
    """Whether ``name`` belongs to the metric vocabulary of this module's docstring."""
    split, _, rest = name.partition("/")
    return name in (STEP, *PLAIN_METRICS) or (split in SPLITS and bool(rest))


def under(split: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` named in the vocabulary under ``split``: ``val_loss``, ``valid_ppl`` and
    ``top1`` become ``val/loss``, ``val/ppl`` and ``val/top1`` (``ema_val_loss``:
    ``val/ema_loss``)."""
    alias = re.compile(rf"(^|_)({_SPLIT_ALIASES[split]})_")
    return {split + "/" + alias.sub(r"\1", key): value for key, value in metrics.items()}


def summary_goal(name: str) -> str | None:
    """``"min"``, ``"max"`` or None (only the last value): what the run summary keeps of
    ``name`` besides its last value."""
    leaf = name.rsplit("/", 1)[-1]
    if LOWER_IS_BETTER.search(leaf):
        return "min"
    if HIGHER_IS_BETTER.search(leaf):
        return "max"
    return None


def run_tags(cfg: DictConfig | Mapping) -> list[str]:
    """W&B tags every run carries: normaliser (attention and output), model, seed, profile,
    fidelity."""
    attn, _ = normalizer_options(cfg, "attention")
    out, _ = normalizer_options(cfg, "output")
    tags = [f"normalizer={attn}", f"output_normalizer={out}", f"seed={cfg.get('seed', 0)}"]
    model = cfg.get("model") or {}
    if model.get("name"):
        tags.append(f"model={model.get('name')}")
    profile = cfg.get("profile") or {}
    if profile.get("name"):
        tags.append(f"profile={profile.get('name')}")
    fidelity = cfg.get("fidelity") or {}
    if fidelity.get("name"):
        tags.append(f"fidelity={fidelity.get('name')}")
    return tags


def _hydra_choice(group: str) -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group)
    except (ImportError, ValueError):
        return None


def run_name(cfg: DictConfig | Mapping) -> str:
    """``<experiment>-<normaliser>-seed<seed>``: the experiment as chosen
    (``experiment=...``; the task outside Hydra), the normaliser as the tables name it."""
    experiment = _hydra_choice("experiment") or cfg.get("task") or "run"
    attn, options = normalizer_options(cfg, "attention")
    label = normalizer_label(
        attn, options, normalizer_options(cfg, "output")[0], cfg.get("fidelity")
    )
    return f"{experiment}-{label}-seed{cfg.get('seed', 0)}"


def _sweep_group() -> str | None:
    """In a Hydra multirun, the sweep directory's name groups its runs in W&B."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return Path(hc.sweep.dir).name
    except (ImportError, ValueError):
        pass
    return None


def init_wandb(
    cfg: DictConfig,
    run_dir: str | Path,
    name: str | None = None,
    tags: list[str] | None = None,
    group: str | None = None,
):
    """Start (or, after a restart, continue) the W&B run of this run directory.

    Returns the run, or None for ``logger=none``. Offline unless ``logger.mode=online``; the
    run id is kept in the run dir so a resumed run continues the same W&B run. Name
    :func:`run_name` unless given; job type ``logger.job_type``; group ``logger.group``, else
    the sweep. No API key is ever written by us.
    """
    logger = cfg.get("logger") or {}
    if logger.get("name", "none") == "none":
        return None
    require_writable(
        Path(run_dir) / "wandb", "the W&B directory", "make it writable, or logger=none"
    )
    import wandb

    run_dir = Path(run_dir)
    id_file = run_dir / WANDB_ID_FILE
    curve = run_dir / METRICS_LOG
    resumes = id_file.exists() and curve.exists() and curve.stat().st_size > 0
    run_id = id_file.read_text().strip() if resumes else uuid.uuid4().hex[:8]
    if not resumes:
        atomic_write_text(id_file, run_id)
    mode = os.environ.get("WANDB_MODE") or logger.get("mode", "offline")
    tags = [*(logger.get("tags") or []), *run_tags(cfg), *(tags or [])]
    run = wandb.init(
        project=logger.get("project"),
        entity=logger.get("entity"),
        group=group or logger.get("group") or _sweep_group(),
        job_type=logger.get("job_type"),
        name=name or run_name(cfg),
        tags=list(dict.fromkeys(tags)),
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=mode,
        settings=wandb.Settings(
            silent=True,
            console="off",
            # how often W&B's service writes the offline file: what a kill -9 can lose
            x_transaction_log_flush_interval=float(logger.get("flush_every_seconds", 15.0)),
        ),
    )
    run.define_metric(STEP)
    for pattern in (*(f"{split}/*" for split in SPLITS), *PLAIN_METRICS):
        run.define_metric(pattern, step_metric=STEP)
    return run


# Per W&B run id: the metrics whose summary goal is defined already; the run ids whose last
# logged step is a row W&B still holds open.
_DEFINED: dict[str, set[str]] = {}
_OPEN_ROW: set[str] = set()


def _define_summaries(wandb_run, names) -> None:
    defined = _DEFINED.setdefault(wandb_run.id, set())
    for name in names:
        if name not in defined and (goal := summary_goal(name)):
            wandb_run.define_metric(name, step_metric=STEP, summary=f"{goal},last")
        defined.add(name)


def log_metrics(
    run_dir: str | Path, step: int, metrics: Mapping[str, float], wandb_run=None
) -> None:
    """Append one line ``{"step": ..., **metrics}`` to ``metrics.jsonl`` in the run dir (the
    source of training-curve figures) and log the same to W&B when a run is given. Every
    name must be in the vocabulary (this module's docstring): ValueError otherwise."""
    strange = [name for name in metrics if not is_vocabulary(name) or name == STEP]
    if strange:
        raise ValueError(
            f"metric names {strange} are not in the vocabulary of experiments.core.tracking "
            "(train/..., val/..., test/..., lr, throughput, epoch)"
        )
    values, _ = finite_or_null(metrics)
    record = {STEP: int(step), **values}
    path = Path(run_dir) / METRICS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    if wandb_run is not None:
        _define_summaries(wandb_run, metrics)
        wandb_run.log({STEP: int(step), **metrics}, step=int(step))
        _OPEN_ROW.add(wandb_run.id)


def commit_metrics(wandb_run) -> None:
    """Write the W&B row of the last step logged (W&B holds it open for more of that step):
    called before a checkpoint is saved, so W&B's service gets every row up to the step a
    killed run resumes from (it writes them to the offline file on its own time), and the
    resumed run logs the rest again."""
    if wandb_run is not None and wandb_run.id in _OPEN_ROW:
        wandb_run.log({}, commit=True)  # (with no row open this would add an empty one)
        _OPEN_ROW.discard(wandb_run.id)


def _result_table(result: RunResult):
    """One row: the run as ``results.json`` has it (W&B joins the rows of many runs)."""
    import wandb

    fields = {k: v for k, v in asdict(result).items() if k not in ("config", "metrics")}
    fields = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in fields.items()}
    row = {**fields, **{f"test/{k}": v for k, v in result.metrics.items()}}
    return wandb.Table(columns=list(row), data=[list(row.values())])


def _log_artifacts(run, result: RunResult, run_dir: Path, checkpoint: Path | None) -> None:
    import wandb

    results = wandb.Artifact(f"results-{run.id}", type="results")
    for name in (RESULTS_FILE, METRICS_LOG):
        if (run_dir / name).exists():
            results.add_file(str(run_dir / name), name=name)
    run.log_artifact(results)
    logger = dict(run.config).get("logger") or {}
    if checkpoint is not None and checkpoint.exists() and logger.get("log_checkpoint"):
        model = wandb.Artifact(f"model-{run.id}", type="model", metadata={"step": result.steps})
        model.add_file(str(checkpoint), name=checkpoint.name)
        run.log_artifact(model, aliases=["latest", "final"])


def sync_command(run) -> str:
    """``wandb sync <run dir>/wandb/offline-run-*-<id>*``: every offline folder of the run (one
    per invocation, all with the run's id; W&B adds ``-1``, ``-2`` to a folder started in the
    same second as another), which ``wandb sync`` uploads oldest first as one run; folders of
    a superseded id (a start-over) are left out (ids have one length: none is another's
    prefix)."""
    wandb_dir = shlex.quote(str(Path(run.settings.sync_dir).parent))
    return f"wandb sync {wandb_dir}/offline-run-*-{run.id}*"


def finish_wandb(
    run,
    result: RunResult | None = None,
    run_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
) -> None:
    """Finish the run and, when offline, print the one-line command that uploads it.

    With ``result``: the run summary gets the fields of ``results.json`` (minus the config,
    which W&B already holds) with each metric as ``test/<name>``, and the run logs a one-row
    ``results`` table; with ``run_dir`` too, ``results.json`` and ``metrics.jsonl`` become a
    ``results`` artifact, and ``checkpoint`` a ``model`` artifact when
    ``logger.log_checkpoint`` is true.
    """
    if run is None:
        return
    if result is not None:
        summary = {k: v for k, v in asdict(result).items() if k not in ("config", "metrics")}
        metrics = {**result.metrics, result.metric_name: result.metric_value}
        run.summary.update({**summary, **{f"test/{k}": v for k, v in metrics.items()}})
        run.log({"results": _result_table(result)})
        if run_dir is not None:
            _log_artifacts(run, result, Path(run_dir), Path(checkpoint) if checkpoint else None)
    offline = getattr(run.settings, "mode", None) == "offline"
    command = sync_command(run)
    _DEFINED.pop(run.id, None)
    _OPEN_ROW.discard(run.id)
    run.finish()
    if offline:
        print(f"W&B run saved offline; upload it with: {command}", flush=True)

"""Weights & Biases and the run's own training-curve log."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.core.io import atomic_write_text
from experiments.core.results import METRICS_LOG, RunResult, finite_or_null
from experiments.core.setup import normalizer_options

WANDB_ID_FILE = "wandb_run_id.txt"


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
    run id is kept in the run dir so a resumed run continues the same W&B run. No API key is
    ever written by us.
    """
    logger = cfg.get("logger") or {}
    if logger.get("name", "none") == "none":
        return None
    import wandb

    run_dir = Path(run_dir)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    if not id_file.exists():
        atomic_write_text(id_file, run_id)
    mode = os.environ.get("WANDB_MODE") or logger.get("mode", "offline")
    tags = [*(logger.get("tags") or []), *run_tags(cfg), *(tags or [])]
    group = group or logger.get("group") or _sweep_group()
    run = wandb.init(
        project=logger.get("project"),
        entity=logger.get("entity"),
        group=group,
        name=name,
        tags=list(dict.fromkeys(tags)),
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        mode=mode,
        settings=wandb.Settings(silent=True, console="off"),
    )
    return run


def finish_wandb(run, result: RunResult | None = None) -> None:
    """Finish the run and, when offline, print the one-line command that uploads it.

    With ``result``, the run summary gets the same fields as ``results.json`` (minus the
    config, which W&B already holds), so tables can be made from W&B alone.
    """
    if run is None:
        return
    if result is not None:
        summary = {k: v for k, v in asdict(result).items() if k not in ("config", "metrics")}
        run.summary.update({**summary, **{f"metrics/{k}": v for k, v in result.metrics.items()}})
    offline = run.settings.mode == "offline" if hasattr(run.settings, "mode") else False
    run_path = getattr(run.settings, "sync_dir", None)
    run.finish()
    if offline and run_path:
        print(f"W&B run saved offline; upload it with: wandb sync {run_path}")


def log_metrics(
    run_dir: str | Path, step: int, metrics: Mapping[str, float], wandb_run=None
) -> None:
    """Append one line ``{"step": ..., **metrics}`` to ``metrics.jsonl`` in the run dir (the
    source of training-curve figures) and log the same to W&B when a run is given."""
    values, _ = finite_or_null(metrics)
    record = {"step": int(step), **values}
    path = Path(run_dir) / METRICS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")
    if wandb_run is not None:
        wandb_run.log(dict(metrics), step=int(step))

"""What every experiment entry point shares, written once: seeding, distributed context,
run directory (its lock, its wall clock, finished-run detection), atomic files, checkpoints,
W&B, normaliser options, ``results.json`` (strict JSON) and the one-line stop of a run.

Entry points stay thin: compose config -> build parts -> run -> ``write_results``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_FILE = "results.json"
WANDB_ID_FILE = "wandb_run_id.txt"
LOCK_FILE = ".run.lock"
CLOCK_FILE = "wall_clock.json"
# Exit code of a run stopped on purpose (non-finite loss) with its last good checkpoint kept.
STOP_EXIT_CODE = 3
# Exit code of a run refused before it started (bad input, run dir in use).
USAGE_EXIT_CODE = 2


# --- stopping a run with one line -----------------------------------------------------------


class RunStop(Exception):
    """Ends a run with one line for the user (no traceback) and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(RunStop, ValueError):
    """A configured value the run cannot use: one line naming the key and the fix."""


@contextlib.contextmanager
def stops_cleanly() -> Iterator[None]:
    """Around an app's work: a :class:`RunStop` prints ``ERROR: <message>`` on stderr and
    exits with its code, without a traceback (with one first under ``HYDRA_FULL_ERROR=1``).
    A run directory this invocation created and left holding nothing but Hydra's record and
    the lock is removed, so nothing looks like a run."""
    try:
        yield
    except RunStop as stop:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        discard_unused_run_dir()
        print(f"ERROR: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)


# The run directory this invocation is about to create (None: it existed, or no Hydra run).
_NEW_RUN_DIR: Path | None = None
# What Hydra and the lock put into a run directory before the app writes anything.
_BEFORE_ANY_WORK = (".hydra", LOCK_FILE)


def note_run_dir(run_dir: str | Path) -> None:
    """Called before Hydra creates the run directory: remember it if this invocation makes it."""
    global _NEW_RUN_DIR
    run_dir = Path(run_dir).resolve()
    _NEW_RUN_DIR = None if run_dir.exists() else run_dir


def discard_unused_run_dir() -> None:
    """Remove the run directory this invocation created, if it holds nothing but Hydra's
    ``.hydra/`` record and the lock file (the app stopped before its first file)."""
    run_dir = _NEW_RUN_DIR
    if run_dir is None or not run_dir.is_dir():
        return
    if any(p.name not in _BEFORE_ANY_WORK for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def resume_command(run_dir: str | Path) -> str | None:
    """The command that continues this run: the app and its overrides as given, with
    ``hydra.run.dir=`` set to ``run_dir``; None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    skip = ("hydra.run.dir=", "hydra.mode=")
    overrides += [o for o in hc.overrides.hydra if not o.startswith(skip)]
    args = shlex.join([*overrides, f"hydra.run.dir={Path(run_dir).resolve()}"])
    app = f"-m experiments.{hc.job.name} {args}"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's own flags are not known here
        return f"the same torchrun ... {app}"
    return f"python {app}"


def resume_hint(run_dir: str | Path) -> str:
    """``to resume: <the exact command>`` (the run dir named, so a ``${now:...}`` default
    does not start a new run)."""
    command = resume_command(run_dir)
    if command is None:
        return f"rerun the same command to resume from {run_dir}"
    return f"to resume: {command}"


# --- what a run prints -----------------------------------------------------------------------

VERBOSE_ENV = "MULTIMAX_VERBOSE"
# Warnings issued by any module but the project's own (those keep Python's default filters).
_NOT_OUR_MODULES = r"(?!(experiments|multimax|scripts)(\.|$))"


def verbose() -> bool:
    """Whether third-party output is wanted (``verbose=true``; children inherit it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def configure_output(verbose: bool = False) -> None:
    """The default output of an app is the project's own progress lines: third-party
    warnings, log records below ERROR and progress bars (datasets, subword-nmt) are kept out
    of it; ``verbose=true`` shows them. Child processes inherit the choice."""
    import logging

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        logging.getLogger().setLevel(logging.INFO)
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # bars of libraries; ours pass disable= themselves
    warnings.filterwarnings("ignore", module=_NOT_OUR_MODULES)
    logging.getLogger().setLevel(logging.ERROR)
    if "datasets" in sys.modules:  # read the variable at import: tell it now as well
        sys.modules["datasets"].disable_progress_bars()


def _help_resolver(app: str) -> str:
    from experiments.config_check import help_text

    return help_text(app)


if not OmegaConf.has_resolver("app_help"):
    OmegaConf.register_new_resolver("app_help", _help_resolver)


# --- seeding and distributed context ----------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistributedContext:
    """Rank / world size from torchrun's (or SLURM's) environment; single-process otherwise."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> DistributedContext:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank)


# --- files --------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_commit() -> str:
    """The repository's HEAD commit (with ``-dirty`` if the tree has changes), or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- checkpoints --------------------------------------------------------------------------

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_PREVIOUS = "checkpoint_previous.pt"


def save_checkpoint(state: Mapping[str, Any], run_dir: str | Path) -> Path:
    """Atomically write ``checkpoint_last.pt``, keeping the one before as
    ``checkpoint_previous.pt`` (the fallback if the last is ever unreadable)."""
    run_dir = Path(run_dir)
    last = run_dir / CHECKPOINT_LAST
    if last.exists():
        os.replace(last, run_dir / CHECKPOINT_PREVIOUS)
    atomic_torch_save(dict(state), last)
    return last


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest readable checkpoint in ``run_dir`` (``weights_only=True``), or None.

    A corrupt ``checkpoint_last.pt`` falls back to ``checkpoint_previous.pt`` with a warning.
    """
    run_dir = Path(run_dir)
    for name in (CHECKPOINT_LAST, CHECKPOINT_PREVIOUS):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file means: try the older one
            warnings.warn(
                f"checkpoint {path} is unreadable ({err}); trying an older one", stacklevel=2
            )
    return None


# --- the run directory: one live trainer, a wall clock across resumes, finished runs -------


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.run.lock`` while a run lives in the directory.

    The kernel drops the lock when the last process holding its file descriptor ends, so a
    killed run can never leave it held; a child that inherits :attr:`fd` (the fairseq
    trainer) keeps it held for as long as it lives, even if its parent was killed. A second
    run in the same directory stops with :class:`RunStop` naming the holder.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunStop(
                f"{self.path.parent} is in use by a live run ({holder}); wait for it to end, "
                "stop it, or give this run another hydra.run.dir=..."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        os.set_inheritable(fd, True)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock unless a live child still holds the file
            self.fd = None


class RunClock:
    """Wall-clock seconds a run has spent, summed over every invocation (resumes included).

    The total so far lives in ``<run dir>/wall_clock.json``; :meth:`tick` rewrites it
    (atomically), so a killed invocation loses at most the time since its last tick.
    """

    def __init__(self, run_dir: str | Path, start_over: bool = False) -> None:
        self.path = Path(run_dir) / CLOCK_FILE
        self.before = 0.0
        if self.path.exists() and not start_over:
            try:
                self.before = float(json.loads(self.path.read_text())["seconds"])
            except (OSError, ValueError, KeyError, TypeError):
                self.before = 0.0  # an unreadable clock restarts at zero, like a new run
        self.start = time.monotonic()
        self.last_tick = 0.0

    def total(self) -> float:
        return self.before + time.monotonic() - self.start

    def tick(self, min_interval: float = 0.0) -> None:
        now = time.monotonic()
        if now - self.last_tick < min_interval:
            return
        self.last_tick = now
        atomic_write_text(self.path, json.dumps({"seconds": self.total()}) + "\n")


def finished_result(run_dir: str | Path, total_steps: int) -> RunResult | None:
    """The run's ``results.json`` if it exists, reads, and records at least ``total_steps``
    steps (the configured schedule): a rerun of such a run has nothing to do."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists() or total_steps <= 0:
        return None
    try:
        result = read_results(path)
    except ValueError:
        return None
    return result if result.steps >= total_steps else None


def trim_metrics_log(run_dir: str | Path, step: int) -> None:
    """Drop training-curve lines written after ``step`` (the checkpoint a run resumes from;
    0 when it starts over), so a resumed curve has no duplicate steps."""
    path = Path(run_dir) / METRICS_LOG
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash we resume from
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# --- normaliser options from the config -----------------------------------------------------


def normalizer_options(cfg: DictConfig | Mapping, which: str = "attention") -> tuple[str, dict]:
    """(name, options) for ``build_normalizer`` from ``cfg.normalizer`` and
    ``cfg.model.output_normalizer``.

    ``normalizer=NAME`` sets attention and output alike; ``model.output_normalizer=NAME``
    sets the output layer apart (it then gets that normaliser's default options).
    """
    norm = (
        OmegaConf.to_container(cfg["normalizer"], resolve=True)
        if isinstance(cfg["normalizer"], DictConfig)
        else dict(cfg["normalizer"])
    )
    name = norm.pop("name")
    if which == "attention":
        return name, norm
    if which != "output":
        raise ValueError(f"which must be 'attention' or 'output', got {which!r}")
    model = cfg.get("model") or {}
    out_name = model.get("output_normalizer") or name
    return out_name, (norm if out_name == name else {})


# --- W&B ------------------------------------------------------------------------------------


def run_tags(cfg: DictConfig | Mapping) -> list[str]:
    """W&B tags every run carries: normaliser (attention and output), model, seed, profile."""
    attn, _ = normalizer_options(cfg, "attention")
    out, _ = normalizer_options(cfg, "output")
    tags = [f"normalizer={attn}", f"output_normalizer={out}", f"seed={cfg.get('seed', 0)}"]
    model = cfg.get("model") or {}
    if model.get("name"):
        tags.append(f"model={model.get('name')}")
    profile = cfg.get("profile") or {}
    if profile.get("name"):
        tags.append(f"profile={profile.get('name')}")
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


# --- results.json ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """The contents of every run's ``results.json`` (INTERFACES.md)."""

    task: str
    dataset: str
    model: str
    normalizer: str
    output_normalizer: str
    seed: int
    metric_name: str
    metric_value: float | None
    steps: int
    wall_seconds: float
    profile: str = "paper"
    metrics: dict[str, float | None] = field(default_factory=dict)
    null_reasons: dict[str, str] = field(default_factory=dict)
    git_commit: str = field(default_factory=git_commit)
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    config: dict = field(default_factory=dict)


def finite_or_null(
    values: Mapping[str, Any], reasons: Mapping[str, str] | None = None
) -> tuple[dict[str, float | None], dict[str, str]]:
    """(values with every non-finite number as None, why each None is None): strict JSON
    has no NaN or Infinity. ``reasons`` names the cause where the caller knows it."""
    reasons = dict(reasons or {})
    out: dict[str, float | None] = {}
    why: dict[str, str] = {}
    for key, value in values.items():
        if value is None or not math.isfinite(float(value)):
            out[key] = None
            why[key] = reasons.get(key) or ("not measured" if value is None else f"was {value}")
        else:
            out[key] = float(value)
    return out, why


def write_results(run_dir: str | Path, result: RunResult, cfg: DictConfig | None = None) -> Path:
    """Atomically write ``results.json`` in ``run_dir`` as strict JSON (non-finite numbers
    become null, their reason in ``null_reasons``); ``cfg`` is stored resolved."""
    if cfg is not None:
        result.config = OmegaConf.to_container(cfg, resolve=True)
    reasons = dict(result.null_reasons)
    result.metrics, why = finite_or_null(result.metrics, reasons)
    headline, headline_why = finite_or_null({"metric_value": result.metric_value}, reasons)
    result.metric_value = headline["metric_value"]  # type: ignore[assignment]
    result.null_reasons = {**why, **headline_why}  # only the values that are null
    path = Path(run_dir) / RESULTS_FILE
    text = json.dumps(asdict(result), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def read_results(path: str | Path) -> RunResult:
    """Read a ``results.json``; raises ``ValueError`` naming the file if it is broken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return RunResult(**data)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: not a valid {RESULTS_FILE} ({err})") from err


def hydra_run_dir() -> Path:
    """The current Hydra run directory (the job's output dir)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


# --- dry runs for cluster jobs ----------------------------------------------------------------


def dry_run_report(
    *,
    task: str,
    parameters: int,
    items_per_step: int,
    item_name: str,
    step_seconds: float,
    total_steps: int,
    device: torch.device,
    world_size: int = 1,
) -> str:
    """The lines printed by ``dry_run=true``: what the full schedule would cost.

    ``step_seconds`` is the measured time of one optimiser step on this device (after a
    warm-up step); the estimate assumes the same step time on every device of the job.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"{peak:.2f} GiB peak allocated on {torch.cuda.get_device_name(device)}"
    else:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory = f"{rss:.2f} GiB peak resident (CPU)"
    hours = step_seconds * total_steps / 3600
    lines = [
        f"[dry run] {task}",
        f"  parameters:        {parameters:,}",
        f"  {item_name} per step:  {items_per_step:,} (world size {world_size})",
        f"  peak memory:       {memory}",
        f"  step time:         {step_seconds:.3f} s on {device.type}",
        f"  full schedule:     {total_steps:,} steps ≈ {hours:.1f} h wall on this device",
    ]
    text = "\n".join(lines)
    print(text)
    return text


# --- training curves ------------------------------------------------------------------------

METRICS_LOG = "metrics.jsonl"


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

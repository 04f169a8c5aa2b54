"""The run directory: one live run at a time (lock), a wall clock across resumes, finished-run
detection, checkpoints, the resume command, and the one-line stop of a run."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from experiments.core.errors import RunStop
from experiments.core.io import atomic_torch_save, atomic_write_text
from experiments.core.results import METRICS_LOG, RESULTS_FILE, RunResult, read_results

LOCK_FILE = ".run.lock"
CLOCK_FILE = "wall_clock.json"


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


def hydra_run_dir() -> Path:
    """The current Hydra run directory (the job's output dir)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)

"""The run directory: one object (:class:`RunDir`) that every pipeline opens around its
training, and the answer to "how does a run resume after ``kill -9``".

A run lives in one directory (Hydra's ``hydra.run.dir``) and is continued by rerunning the
same command with the same directory (:func:`resume_hint` prints it). End to end:

1. **Finished?** ``results.json`` that reads and records at least the configured number of
   steps means the run is done: :meth:`RunDir.open` yields with :attr:`RunDir.finished` set,
   takes no lock and touches nothing, and the pipeline returns that result.
2. **The lock.** Otherwise the main process takes an exclusive ``flock`` on ``.run.lock``
   (:class:`RunLock`). The kernel drops it when the last holder dies, so a killed run never
   leaves it held; a child that inherits its descriptor (the fairseq trainer) holds it for as
   long as it lives. A second live run in the directory stops with one line.
3. **The resume point.** The pipeline's ``resume`` function names the newest *readable*
   checkpoint and its step (:class:`ResumePoint`). Checkpoints are written through a temp file
   and a rename, so a kill leaves the old one or the new one, never half of one; a file cut
   short anyway (a full disk) is skipped for the one before it (``checkpoint_previous.pt``
   here, fairseq's numbered checkpoints there) with one line. Nothing readable: step 0.
4. **The wall clock** (:class:`RunClock`, ``wall_clock.json``) continues from its last tick
   (every few seconds and at each checkpoint); it starts over with the run at step 0.
5. **The metrics log** (``metrics.jsonl``) loses the lines written after the resume step, so
   the resumed curve has each step once.
6. **Training** restores the checkpoint and continues onto exactly the batches the
   uninterrupted run reads: vision keeps model, EMA, optimiser, scheduler, scaler, sampler
   position and every process's RNG states (``experiments.pipelines.vision.state``); fairseq
   gets ``--restore-file`` and the plugin's ``multimax_*`` tasks (epoch-seeded batches); the
   mechanism study has no checkpoints (a run of seconds) and starts over.
7. **Results.** :meth:`RunDir.write_results` writes ``results.json`` atomically, as the last
   file, with the clock's total: until it exists the run is unfinished and step 1 resumes it.

8. **A stop signal** (SIGTERM, SIGUSR2: ``scancel``, a preemption, a SLURM time limit) saves a
   checkpoint at the current step first and prints the resume command
   (``experiments.core.signals``; docs/cluster.md).

An app wraps its work in :func:`stops_cleanly`: a :class:`RunStop` becomes one ``ERROR:`` line
and its exit code, and a run directory the invocation created but never wrote into is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.core.errors import RunStop
from experiments.core.io import atomic_torch_save, atomic_write_text, require_writable
from experiments.core.results import (
    METRICS_LOG,
    RESULTS_FILE,
    RunResult,
    read_results,
    write_results,
)

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
    with stops_cleanly():  # one line, before Hydra's own mkdir fails with a traceback
        require_writable(run_dir, "the run directory", "give hydra.run.dir=... a writable place")
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


# Characters a value may hold unquoted in Hydra's override grammar with the same meaning.
_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/+.%@:-]+")


def hydra_quoted(value: str) -> str:
    """``value`` written so that Hydra's override grammar reads it back unchanged: as it is
    when plain, else in single quotes (a quote and the backslashes before it escaped, as are
    the backslashes before the closing quote and every ``${``, which would interpolate)."""
    if _HYDRA_PLAIN.fullmatch(value):
        return value
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return "'" + escaped.replace("${", "\\${") + "'"


def resume_command(run_dir: str | Path) -> str | None:
    """The command that continues this run: the app and its overrides as given, with
    ``hydra.run.dir=`` set to ``run_dir``; None outside a Hydra app."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    skip = ("hydra.run.dir=", "hydra.mode=")
    overrides += [o for o in hc.overrides.hydra if not o.startswith(skip)]
    run_dir_override = f"hydra.run.dir={hydra_quoted(str(Path(run_dir).resolve()))}"
    args = shlex.join([*overrides, run_dir_override])
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
    ``checkpoint_previous.pt`` (the fallback if the last is ever unreadable). The old one is
    moved only once the new one is complete: a failed save (full disk) keeps it as it was."""
    run_dir = Path(run_dir)
    last = run_dir / CHECKPOINT_LAST
    atomic_torch_save(dict(state), last, keep_previous=run_dir / CHECKPOINT_PREVIOUS)
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
    return Path(HydraConfig.get().runtime.output_dir)


# --- the run directory object --------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: ``step`` done (0: from scratch), what the pipeline restores
    from (a loaded checkpoint, a file to hand to fairseq; None: nothing), and a line for the
    user (e.g. why an unreadable checkpoint was passed over)."""

    step: int
    state: Any = None
    note: str | None = None


def start_over(_path: Path) -> ResumePoint:
    """The resume point of a run without checkpoints: always step 0."""
    return ResumePoint(0)


def latest_checkpoint(path: Path) -> ResumePoint:
    """``checkpoint_last.pt``, else ``checkpoint_previous.pt`` (with a warning), loaded as
    :attr:`ResumePoint.state` (its ``"step"`` is the step); step 0 when neither reads."""
    had = any((path / name).exists() for name in (CHECKPOINT_LAST, CHECKPOINT_PREVIOUS))
    state = load_checkpoint(path, map_location="cpu")
    if state is not None:
        return ResumePoint(int(state["step"]), state)
    note = f"no readable checkpoint in {path}: starting over from step 0" if had else None
    return ResumePoint(0, None, note)


class RunDir:
    """One run directory through one invocation (the numbered steps of this module's
    docstring). Use :meth:`open`::

        with RunDir.open(run_dir, total_steps=N, resume=latest_checkpoint) as run:
            if run.finished is not None:
                return run.finished
            ... restore run.resume.state, train from run.resume_step, run.tick() ...
            run.write_results(result, cfg)

    Only the main process (``is_main``) locks, keeps the clock, trims the metrics log, prints
    and writes results; every process sees :attr:`finished` and :attr:`resume`.
    """

    def __init__(self, path: str | Path, total_steps: int, is_main: bool = True) -> None:
        self.path = Path(path)
        self.total_steps = int(total_steps)
        self.is_main = is_main
        self.finished: RunResult | None = finished_result(self.path, self.total_steps)
        self.lock: RunLock | None = None
        self.clock: RunClock | None = None
        self.resume = ResumePoint(0)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: str | Path,
        *,
        total_steps: int,
        resume: Callable[[Path], ResumePoint] = start_over,
        is_main: bool = True,
        prefix: str = "",
    ) -> Iterator[RunDir]:
        """Finished? (then nothing else) → lock → resume point → clock → trimmed metrics log;
        the lock is released on leaving. ``prefix`` starts every line printed (``"[lm] "``)."""
        run = cls(path, total_steps, is_main)
        if run.finished is not None:
            if is_main:
                print(prefix + run.finished_line(), flush=True)
            yield run
            return
        with RunLock(run.path) if is_main else contextlib.nullcontext() as lock:
            run.lock = lock
            run.resume = resume(run.path)
            if is_main:
                if run.resume.note:
                    print(prefix + run.resume.note, flush=True)
                run.clock = RunClock(run.path, start_over=run.resume.step == 0)
                trim_metrics_log(run.path, run.resume.step)
            yield run

    def finished_line(self) -> str:
        done = self.finished
        assert done is not None
        value = "null" if done.metric_value is None else f"{done.metric_value:.2f}"
        return (
            f"{self.path} holds a finished run ({done.metric_name} = {value}, {done.steps} "
            "steps): nothing to do. Give another hydra.run.dir=... for a new run."
        )

    @property
    def resume_step(self) -> int:
        return self.resume.step

    @property
    def lock_fds(self) -> tuple[int, ...]:
        """The lock's descriptor, for a child process that must hold the lock too."""
        return (self.lock.fd,) if self.lock is not None and self.lock.fd is not None else ()

    def tick(self, min_interval: float = 0.0) -> None:
        """Save the wall clock (main process; at most every ``min_interval`` seconds)."""
        if self.clock is not None:
            self.clock.tick(min_interval)

    def wall_seconds(self) -> float:
        """Wall-clock seconds of the run over every invocation so far."""
        return self.clock.total() if self.clock is not None else 0.0

    def resume_hint(self) -> str:
        return resume_hint(self.path)

    def write_results(self, result: RunResult, cfg: DictConfig | None = None) -> Path:
        """``results.json`` (the run is finished from now on) and a last clock tick."""
        path = write_results(self.path, result, cfg)
        self.tick()
        return path

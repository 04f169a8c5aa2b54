"""Each fairseq stage in a child process of its own: the environment it gets, the run, and
the failure it raises.

A child per stage keeps fairseq's global state (its own Hydra instance, logging, spawned GPU
workers) away from our Hydra app, lets fairseq's own distributed launch (one worker per GPU,
torchrun's or SLURM's environment) work unchanged, and makes a crash or a kill of training
leave our process able to report. The child leads a process group of its own and dies with
this process (``experiments.pipelines.fairseq.worker``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from experiments.core.console import verbose
from experiments.core.io import REPO_ROOT
from experiments.core.signals import passing_stops_to
from experiments.pipelines.fairseq.worker import PARENT_PID_ENV, STAGES

# Variables of torchrun / SLURM that must not reach single-process evaluation children.
_DISTRIBUTED_ENV = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


def child_env(distributed: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("WANDB_MODE", "offline")
    env[PARENT_PID_ENV] = str(os.getpid())
    if not distributed:
        for key in _DISTRIBUTED_ENV:
            env.pop(key, None)
    return env


class StageFailed(RuntimeError):
    """A fairseq stage ended with a non-zero exit code (negative: killed by that signal)."""

    def __init__(self, stage: str, code: int, log_path: Path, tail: list[str]) -> None:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        super().__init__(
            f"fairseq {stage} failed ({how}); full log: {log_path}\n" + "\n".join(tail)
        )
        self.stage, self.code, self.log_path, self.tail = stage, code, log_path, tail


def run_stage(
    stage: str,
    args: list[str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    distributed: bool = False,
    extra_env: Mapping[str, str] | None = None,
    keep_fds: tuple[int, ...] = (),
) -> None:
    """Run one fairseq stage in a child process; every output line goes to ``log_path``
    and to ``on_line``. Raises :class:`StageFailed` with the log's tail if the stage fails.

    The child leads a process group of its own (fairseq's workers join it) and dies with
    this process (see ``experiments.pipelines.fairseq.worker``); if this process is interrupted, the
    whole group is killed. ``keep_fds`` stay open in the child (the run directory's lock)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-u", "-m", "experiments.pipelines.fairseq.worker", stage, *args]
    tail: list[str] = []
    env = {**child_env(distributed), **(extra_env or {})}
    with log_path.open("a", buffering=1) as log:  # line-buffered: complete up to a kill
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            cwd=os.getcwd(),
            start_new_session=True,
            pass_fds=keep_fds,
        )
        assert proc.stdout is not None
        echo = verbose()  # verbose=true: fairseq's own output too, not only the log
        try:
            with passing_stops_to(proc.pid):  # SIGTERM / SIGUSR2 reach the stage too
                for line in proc.stdout:
                    log.write(line)
                    if echo:
                        print(line, end="", flush=True)
                    tail = (tail + [line.rstrip()])[-40:]
                    if on_line is not None:
                        on_line(line.rstrip("\n"))
                code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0:
        raise StageFailed(stage, code, log_path, tail)

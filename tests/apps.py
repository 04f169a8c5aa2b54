"""Running the project's Hydra apps and scripts as a user does, in subprocesses: to completion,
or in the background to kill them at a chosen line of their output.

No call here has a fixed timeout: how long a run takes depends on the machine's load, and
pytest-timeout (``timeout`` in pyproject.toml) is the one guard against a hung test."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from experiments.core.io import REPO_ROOT

# The vision smoke pipeline at test size: 2 epochs of 11 steps at batch 128, one thread.
SHORT_VISION = [
    "profile=smoke",
    "logger=none",
    "trainer.epochs=2",
    "trainer.batch_size=128",
    "trainer.threads=1",
    "trainer.log_every_steps=5",
    "trainer.checkpoint_every_steps=100",
    "trainer.ema=true",
    "trainer.ema_decay=0.9",
    "optim.clip_grad=1.0",
]
# The LM / MT smoke pipelines at test size: seconds per run on two CPU cores.
TINY_LM = [
    "experiment=lm_wikitext103",
    "profile=smoke",
    "logger=none",
    "data.corpus.generate.n_train=300",
    "data.corpus.generate.n_valid=20",
    "data.corpus.generate.n_test=20",
    "train.max_tokens=512",
    "train.log_interval=5",
    "evaluate.args.context_window=16",
]
TINY_MT = [
    "experiment=mt_iwslt14_deen",
    "profile=smoke",
    "logger=none",
    "data.corpus.generate.n_train=400",
    "data.corpus.generate.n_valid=10",
    "data.corpus.generate.n_test=10",
    "data.recipe.bpe_symbols=100",
    "train.max_tokens=1024",
    "train.log_interval=4",
    "evaluate.args.beam=2",
    "evaluate.args.max_len_b=12",
]


def app_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell with the project's environment activated (its
    ``python`` first on PATH: a printed ``python -m ...`` runs as the user would run it),
    W&B offline (``make`` exports HYDRA_FULL_ERROR=1, which a user does not have: errors are
    tested as a user sees them)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return dict(env, PATH=path, WANDB_MODE="offline", PYTHONUNBUFFERED="1", **extra)


def run(
    cmd: list[str], env: dict | None = None, cwd: str | Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """``cmd`` to completion, its output captured (pytest-timeout guards the test)."""
    return subprocess.run(cmd, cwd=cwd, env=env or app_env(), capture_output=True, text=True)


def run_app(
    app: str, overrides: list[str], env: dict | None = None, cwd: str | Path = REPO_ROOT
) -> subprocess.CompletedProcess:
    """``python -m experiments.<app> OVERRIDES`` to completion."""
    return run([sys.executable, "-m", f"experiments.{app}", *overrides], env, cwd)


class Background:
    """A command in the background whose output lines are read as they come."""

    def __init__(self, cmd: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env or app_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    @classmethod
    def app(cls, app: str, overrides: list[str], env: dict | None = None) -> Background:
        return cls([sys.executable, "-m", f"experiments.{app}", *overrides], env)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str) -> str:
        """The first new output line containing ``text``; AssertionError if the process
        ends first."""
        while True:
            line = self._queue.get()
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}; output:\n{self.output[-4000:]}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[int]:
        """The direct children of the process (Linux /proc)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill(self, group: bool = False) -> None:
        """SIGKILL the process (``group``: its whole process group), then reap it."""
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.kill()
        self.proc.wait()

    def finish(self) -> int:
        code = self.proc.wait()
        while True:
            try:
                line = self._queue.get(timeout=5.0)  # a lingering grandchild may hold the pipe
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return code


def is_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie waiting to be reaped counts as dead)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_dead(pids: list[int], timeout: float = 30) -> list[int]:
    """The pids still alive after ``timeout`` seconds (empty when all ended)."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if is_alive(p)]
    return alive


def strict_json(path: Path) -> dict:
    """A JSON file parsed strictly: NaN / Infinity are errors, as in every strict parser."""

    def refuse(name: str):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)

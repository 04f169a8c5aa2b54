"""The GPU check, for the day a CUDA device is lent: one command, under 8 minutes.

    python -m scripts.gpu_check [--budget-s 450] [--only paths,recompiles,...]

Runs each item in its own process, with a time limit, and prints one verdict per item:
PASS (exit status 0) or FAIL (any other, or stopped at its limit) with the last line the
command printed, or SKIP (a package it needs is missing, or the time budget is spent).
Items, in order:

* ``paths``: ``pytest -m cuda tests/gpu/test_gpu_attention_paths.py``: ``impl="auto"``
  trains softmax on SDPA and σ normalisers on FlexAttention, and agrees with the reference;
* ``recompiles``: ``pytest -m cuda tests/gpu/test_gpu_recompiles.py``: no torch._dynamo
  graph built per batch length;
* ``cuda_tests``: ``pytest -m cuda tests``: every other test marked ``cuda``;
* one dry run per experiment of the registry (``configs/experiment/*.yaml``), named after
  it: ``python -m experiments.<app> experiment=<name> dry_run=true`` on the paper profile;
* ``benchmark``: ``python -m experiments.benchmark attention.dtype=bfloat16``, which writes
  ``results/speed_gpu.md``.

The whole output goes to ``results/gpu_check/<UTC time>.txt``. Exit status: 0 when nothing
failed, 1 when an item failed, 2 (one line, nothing run) when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from experiments.core.io import REPO_ROOT
from experiments.core.registry import experiments

OUT_DIR = REPO_ROOT / "results" / "gpu_check"
DEFAULT_BUDGET_S = 450  # all items together: 7.5 minutes, under the promised 8
MIN_ITEM_S = 20  # an item with less time left than this is skipped, not started
# Test files run as items of their own (so that ``--only paths`` runs just them).
PYTEST_ITEMS = {
    "paths": "tests/gpu/test_gpu_attention_paths.py",
    "recompiles": "tests/gpu/test_gpu_recompiles.py",
}


@dataclass(frozen=True)
class Verdict:
    status: str  # PASS | FAIL | SKIP
    line: str

    def __str__(self) -> str:
        return f"{self.status} {self.line}"


@dataclass(frozen=True)
class Item:
    """One check: a command and its time limit."""

    name: str
    command: Sequence[str]
    timeout_s: int
    needs: Sequence[str] = ()  # importable modules it needs; missing ones make it a SKIP


def last_line(output: str) -> str:
    """The command's last non-empty line (pytest's ``=== 3 passed in 9s ===`` unframed)."""
    lines = [line.strip().strip("=").strip() for line in output.splitlines() if line.strip()]
    return next((line for line in reversed(lines) if line), "(no output)")


def judge(rc: int, output: str) -> Verdict:
    """Exit status 0 passes; the line says what the command printed last."""
    if rc == 0:
        return Verdict("PASS", last_line(output))
    return Verdict("FAIL", f"exit status {rc}: {last_line(output)}")


def items(work_dir: Path) -> list[Item]:
    """Every item, in the order it runs; dry runs write into ``work_dir``."""
    python = sys.executable
    pytest = [python, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"]
    out = [Item(name, [*pytest, path], 150, ("pytest",)) for name, path in PYTEST_ITEMS.items()]
    ignore = [f"--ignore={path}" for path in PYTEST_ITEMS.values()]
    out.append(Item("cuda_tests", [*pytest, *ignore, "tests"], 240, ("pytest",)))
    for name, experiment in experiments().items():
        command = [
            python,
            "-m",
            experiment.module,
            f"experiment={name}",
            "dry_run=true",
            "logger=none",
            f"hydra.run.dir={work_dir / name}",
        ]
        out.append(Item(name, command, 180, ("hydra",)))
    benchmark = [
        python,
        "-m",
        "experiments.benchmark",
        "attention.dtype=bfloat16",
        f"hydra.run.dir={work_dir / 'benchmark'}",
    ]
    out.append(Item("benchmark", benchmark, 300, ("hydra",)))
    return out


def item_names() -> list[str]:
    return [item.name for item in items(Path("."))]


def missing_modules(names: Sequence[str]) -> list[str]:
    return [name for name in names if find_spec(name) is None]


def run_command(command: Sequence[str], timeout_s: float) -> tuple[int, str, bool]:
    """(exit status, stdout + stderr, timed out) of ``command`` run from the repository root;
    on time-out its whole process group is stopped and the output so far kept."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, stopped whole on time-out
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        out.seek(0)
        return rc, out.read(), timed_out


class Log:
    """Everything the check prints, kept for ``results/gpu_check/``: written as it goes to a
    ``.partial`` file, renamed into place at the end."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self._file = self.partial.open("w")

    def write(self, text: str, echo: bool = False) -> None:
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()
        if echo:
            print(text, flush=True)

    def close(self) -> Path:
        self._file.close()
        os.replace(self.partial, self.path)
        return self.path


def run_items(checks: Sequence[Item], log: Log, budget_s: float) -> list[tuple[str, Verdict]]:
    """Run ``checks`` in order within ``budget_s`` seconds in all; one verdict each."""
    started = time.monotonic()
    verdicts = []
    for item in checks:
        left = budget_s - (time.monotonic() - started)
        missing = missing_modules(item.needs)
        log.write(f"\n===== {item.name}: {' '.join(item.command)}")
        if missing:
            verdict = Verdict("SKIP", f"not installed here: {', '.join(missing)}")
        elif left < MIN_ITEM_S:
            verdict = Verdict("SKIP", f"time budget spent ({budget_s:.0f} s; --budget-s)")
        else:
            limit = min(item.timeout_s, left)
            t0 = time.monotonic()
            rc, output, timed_out = run_command(item.command, limit)
            seconds = time.monotonic() - t0
            log.write(output)
            verdict = (
                Verdict("FAIL", f"stopped after {limit:.0f} s: {last_line(output)}")
                if timed_out
                else judge(rc, output)
            )
            verdict = Verdict(verdict.status, f"{verdict.line} [{seconds:.0f} s]")
        log.write(f"----- {item.name}: {verdict}")
        print(f"{item.name:>20}  {verdict}", flush=True)
        verdicts.append((item.name, verdict))
    return verdicts


def environment_lines() -> list[str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return [
        f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
        f"{torch.cuda.device_count()} visible",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs",
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
    ]


def cuda_missing() -> str | None:
    """Why this machine cannot run the check, in one line; None when it can."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
        return (
            f"no CUDA device visible (torch {torch.__version__}, torch.cuda.is_available() is "
            f"False{where}): run this on a machine with an NVIDIA GPU"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--only", default="", help="comma-separated item names")
    args = parser.parse_args(argv)
    names = item_names()
    wanted = [name for name in args.only.split(",") if name] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; items: {', '.join(names)}")
    why_not = cuda_missing()
    if why_not is not None:
        print(f"gpu_check: FAIL: {why_not}", file=sys.stderr)
        return 2

    started = time.time()
    stamp = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime(started))
    log = Log(OUT_DIR / f"{stamp}.txt")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        checks = [c for c in items(Path(work)) if c.name in wanted]
        log.write("gpu_check: " + " | ".join(environment_lines()), echo=True)
        verdicts = run_items(checks, log, args.budget_s)
    failed = [name for name, v in verdicts if v.status == "FAIL"]
    total = time.time() - started
    log.write(
        f"\n{len(verdicts) - len(failed)} of {len(verdicts)} not failed in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    path = log.close()
    verdict = "FAIL" if failed else "PASS"
    print(f"gpu_check: {verdict} in {total:.0f} s; output in {path.relative_to(REPO_ROOT)}")
    return 1 if failed else 0

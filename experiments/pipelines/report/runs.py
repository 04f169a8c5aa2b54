"""The runs a report is made from: every ``results.json`` under some paths, read with
:class:`~experiments.core.results.RunResult`, and the one label a normaliser gets in every
table, figure and legend.

Hydra's single-run (``<run dir>/results.json``) and multirun
(``<sweep dir>/<num>_<overrides>/results.json``) layouts are both found by searching the
paths recursively. Nothing is dropped or mixed without a line saying so:

- a broken file is reported by its path and skipped;
- a ``results.json`` whose task is not the task of the table it names is refused;
- of two runs of the same table row and seed, the one that trained longer (more steps;
  the newer on a tie) is kept and the other named;
- a run directory that started training but has no ``results.json`` is listed as
  unfinished, with its last logged step (or as running, while its lock is held).

The label function itself lives in ``experiments.core.setup`` beside ``normalizer_options``
(training code names its runs with it too).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from experiments.core import registry
from experiments.core.results import METRICS_LOG, RESULTS_FILE, RunResult
from experiments.core.rundir import CLOCK_FILE, LOCK_FILE
from experiments.core.setup import normalizer_label


@dataclass(frozen=True)
class FoundRun:
    """A ``results.json`` and the record it holds."""

    path: Path
    result: RunResult

    @property
    def run_dir(self) -> Path:
        return self.path.parent


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``paths`` (a file path is taken as is), sorted;
    ``FileNotFoundError`` for a path that does not exist."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(q for q in p.rglob(RESULTS_FILE) if q.is_file())
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return sorted(found)


def load_runs(paths: Iterable[str | Path]) -> tuple[list[FoundRun], list[str]]:
    """(every readable run under ``paths`` that belongs in its table, one per table row and
    seed; one line per run left out and per unfinished run: "PATH: skipped, why")."""
    paths = list(paths)
    runs, problems = [], []
    for path in find_results(paths):
        try:
            result = RunResult.read(path)
        except ValueError as err:
            problems.append(f"{path}: skipped, {str(err).removeprefix(f'{path}: ')}")
            continue
        foreign = foreign_task(result)
        if foreign is not None:
            problems.append(f"{path}: refused, {foreign}")
            continue
        runs.append(FoundRun(path, result))
    runs, dropped = longest_per_seed(runs)
    return runs, problems + dropped + unfinished_runs(paths)


@functools.cache
def table_tasks() -> dict[str, frozenset[str]]:
    """{table: the tasks its experiments' apps run} (``task:`` of ``configs/<app>.yaml``)."""
    tasks: dict[str, set[str]] = {}
    for e in registry.experiments().values():
        app_config = OmegaConf.load(registry.CONFIG_DIR / f"{e.app}.yaml")
        tasks.setdefault(e.table, set()).add(str(app_config.get("task", e.app)))
    return {table: frozenset(t) for table, t in tasks.items()}


def foreign_task(result: RunResult) -> str | None:
    """Why a run does not belong in the table it names (None: it does, or the table is
    not one the registry knows)."""
    expected = table_tasks().get(result.table or "")
    if expected is None or result.task in expected:
        return None
    return (
        f"its task '{result.task}' is not the task of table '{result.table}' "
        f"({', '.join(sorted(expected))}); move it out of the runs given"
    )


def _row_and_seed(result: RunResult) -> tuple:
    """What makes two runs the same entry of a table: table row (model, normaliser,
    setting, metric) and seed."""
    eps = (result.metrics or {}).get("eps_perplexity_epsilon")
    return (result.table, result.profile, result.model, result.dataset, run_label(result),
            result.metric_name, eps, result.seed)  # fmt: skip


def longest_per_seed(runs: list[FoundRun]) -> tuple[list[FoundRun], list[str]]:
    """One run per table row and seed: the one that trained most steps (the newer on a
    tie), and a line per run dropped. Runs in no table are all kept."""
    best: dict[tuple, FoundRun] = {}
    kept, notes = [], []
    order = sorted(runs, key=lambda r: (r.result.steps, r.result.finished_at or "", str(r.path)))
    for run in reversed(order):
        if run.result.table is None:
            kept.append(run)
            continue
        key = _row_and_seed(run.result)
        if key in best:
            winner = best[key].result
            why = (
                f"which trained longer ({winner.steps} vs {run.result.steps} steps)"
                if run.result.steps < winner.steps
                else f"the newer run of as many steps ({winner.steps})"
            )
            notes.append(
                f"{run.path}: dropped, superseded by {best[key].path} (same table row and "
                f"seed), {why}"
            )
            continue
        best[key] = run
        kept.append(run)
    return sorted(kept, key=lambda r: r.path), sorted(notes)


def last_logged_step(run_dir: Path) -> int | None:
    """The ``step`` of the last readable line of a run's ``metrics.jsonl``."""
    path = run_dir / METRICS_LOG
    if not path.exists():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return None


def _is_running(run_dir: Path) -> bool:
    """True while a live process holds the run directory's lock."""
    lock = run_dir / LOCK_FILE
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def unfinished_runs(paths: Iterable[str | Path]) -> list[str]:
    """One line per run directory under ``paths`` that started (it has a wall clock or a
    metrics log) but has no ``results.json``: running, or unfinished with its last step."""
    lines = []
    dirs: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            for name in (CLOCK_FILE, METRICS_LOG):
                dirs.update(q.parent for q in p.rglob(name))
    for run_dir in sorted(d for d in dirs if not (d / RESULTS_FILE).exists()):
        step = last_logged_step(run_dir)
        at = f"last logged step {step}" if step is not None else "no step logged yet"
        if _is_running(run_dir):
            lines.append(f"{run_dir}: skipped, still running ({at})")
        else:
            lines.append(
                f"{run_dir}: skipped, unfinished ({at}, no results.json); rerun its command "
                f"with hydra.run.dir={run_dir} to finish it"
            )
    return lines


def run_label(result: RunResult, with_output: bool = True) -> str:
    """:func:`normalizer_label` of a run's attention normaliser (and output normaliser), with
    the fidelity setting it ran under (``[authors]``) unless it is the paper's."""
    output = result.output_normalizer if with_output else None
    fidelity = (result.config or {}).get("fidelity") or {"name": result.fidelity}
    return normalizer_label(result.normalizer, result.normalizer_options(), output, fidelity)

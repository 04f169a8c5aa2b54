"""The runs a report is made from: every ``results.json`` under some paths, read with
:class:`~experiments.core.results.RunResult`, and the one label a normaliser gets in every
table, figure and legend.

Hydra's single-run (``<run dir>/results.json``) and multirun
(``<sweep dir>/<num>_<overrides>/results.json``) layouts are both found by searching the
paths recursively. A broken file is reported by its path and skipped. The label function
itself lives in ``experiments.core.setup`` beside ``normalizer_options`` (training code
names its runs with it too).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from experiments.core.results import RESULTS_FILE, RunResult
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
    """(every readable run under ``paths``, one "PATH: skipped, why" line per broken file)."""
    runs, problems = [], []
    for path in find_results(paths):
        try:
            runs.append(FoundRun(path, RunResult.read(path)))
        except ValueError as err:
            problems.append(f"{path}: skipped, {str(err).removeprefix(f'{path}: ')}")
    return runs, problems


def run_label(result: RunResult, with_output: bool = True) -> str:
    """:func:`normalizer_label` of a run's attention normaliser (and output normaliser), with
    the fidelity setting it ran under (``[authors]``) unless it is the paper's."""
    output = result.output_normalizer if with_output else None
    fidelity = (result.config or {}).get("fidelity") or {"name": result.fidelity}
    return normalizer_label(result.normalizer, result.normalizer_options(), output, fidelity)

"""The runs a report is made from: every ``results.json`` under some paths, read with
:class:`~experiments.core.results.RunResult`, and the one label a normaliser gets in every
table, figure and legend.

Hydra's single-run (``<run dir>/results.json``) and multirun
(``<sweep dir>/<num>_<overrides>/results.json``) layouts are both found by searching the
paths recursively. A broken file is reported by its path and skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from experiments.core.io import REPO_ROOT
from experiments.core.results import RESULTS_FILE, RunResult

NORMALIZER_CONFIGS = REPO_ROOT / "configs" / "normalizer"


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


@cache
def _normalizer_defaults(name: str) -> dict[str, Any]:
    path = NORMALIZER_CONFIGS / f"{name}.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if path.exists() else {}


def normalizer_label(
    name: str, options: Mapping[str, Any] | None = None, output: str | None = None
) -> str:
    """The normaliser as every table and figure names it: ``name``, plus the options that
    differ from ``configs/normalizer/<name>.yaml`` (``multimax(order=1)``,
    ``softmax(learn_temperature=True)``), plus ``/output`` when an output normaliser is
    given that is neither the same nor ``none`` (``softmax/multimax``)."""
    label = name
    if options:
        defaults = _normalizer_defaults(name)
        changed = {
            k: v
            for k, v in options.items()
            if k != "name" and (k not in defaults or defaults[k] != v)
        }
        if changed:
            label += f"({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"
    if output and output not in (name, "none"):
        label += f"/{output}"
    return label


def run_label(result: RunResult, with_output: bool = True) -> str:
    """:func:`normalizer_label` of a run's attention normaliser (and output normaliser)."""
    output = result.output_normalizer if with_output else None
    return normalizer_label(result.normalizer, result.normalizer_options(), output)

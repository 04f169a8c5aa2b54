"""The console commands of ``pyproject.toml``'s ``[project.scripts]``: ``multimax-vision``,
``multimax-lm``, ``multimax-mt``, ``multimax-mechanism``, ``multimax-benchmark`` and
``multimax-analyze``.

Each runs its app's module exactly as ``python -m experiments.<app>`` does (same Hydra config
tree beside the file, same job name, same overrides), while ``sys.argv[0]`` stays the
command's name: that is what Hydra's shell completion (``multimax-vision -sc install=bash``)
registers and calls back, which a ``python -m`` command line cannot offer.
"""

from __future__ import annotations

import runpy


def _run(app: str) -> None:
    runpy.run_module(f"experiments.{app}", run_name="__main__")


def vision() -> None:
    _run("vision")


def language_model() -> None:
    _run("language_model")


def translation() -> None:
    _run("translation")


def mechanism() -> None:
    _run("mechanism")


def benchmark() -> None:
    _run("benchmark")


def analyze() -> None:
    _run("analyze")

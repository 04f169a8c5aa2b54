"""What a newcomer sees besides a config refusal: third-party noise hidden unless verbose,
the resume hint outside Hydra, and tests that never wait on a fixed timeout."""

from __future__ import annotations

import ast
import logging
import os
import warnings

import tomllib

from experiments.core.console import VERBOSE_ENV, configure_output, verbose
from experiments.core.io import REPO_ROOT
from experiments.core.rundir import resume_hint

REPO = REPO_ROOT


def test_outside_hydra_the_hint_names_the_run_dir(tmp_path):
    assert resume_hint(tmp_path) == f"rerun the same command to resume from {tmp_path}"


def test_third_party_warnings_are_hidden_unless_verbose(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    level = logging.getLogger().level
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            configure_output(verbose=False)
            warnings.warn_explicit("third party", UserWarning, "x.py", 1, module="timm.data")
            warnings.warn_explicit(
                "ours", UserWarning, "y.py", 1, module="experiments.core.console"
            )
            assert [str(w.message) for w in seen] == ["ours"]
            assert logging.getLogger().level == logging.ERROR
            assert os.environ[VERBOSE_ENV] == "0" and not verbose()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            configure_output(verbose=True)
            warnings.warn_explicit("third party", UserWarning, "x.py", 1, module="timm.data")
            assert [str(w.message) for w in seen] == ["third party"] and verbose()
    finally:
        logging.getLogger().setLevel(level)
        for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.pop(name, None)


# Deadlines on things that take no work may stay: processes dying after SIGKILL, the last
# output lines of a process that has ended (``queue.get``).
_DEADLINES_ALLOWED = {"wait_dead", "get"}


def test_no_test_waits_on_a_fixed_timeout():
    """A subprocess under load takes many times its idle time: tests set no timeouts of
    their own; pytest-timeout (pyproject.toml) is the one guard against a hung test."""
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert int(ini["timeout"]) >= 1800
    fixed = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name not in _DEADLINES_ALLOWED and any(
                    k.arg == "timeout" for k in node.keywords
                ):
                    fixed.append(f"{path.name}:{node.lineno} {name}(timeout=...)")
            elif (
                isinstance(node, ast.FunctionDef)
                and node.name not in _DEADLINES_ALLOWED
                and any(a.arg == "timeout" for a in node.args.args + node.args.kwonlyargs)
            ):
                fixed.append(f"{path.name}:{node.lineno} def {node.name}(timeout=...)")
    assert fixed == []

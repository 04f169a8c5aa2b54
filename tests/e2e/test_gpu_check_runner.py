"""The GPU check (``python -m scripts.gpu_check``) as a user starts it: without CUDA it fails
in one clear line; its runner keeps time limits and budgets, saves the whole output and
judges each command by its exit status; its pytest command selects exactly the tests marked
``cuda``."""

from __future__ import annotations

import sys
import textwrap

from experiments.core.io import REPO_ROOT
from experiments.pipelines import gpu_check
from experiments.pipelines.gpu_check import Item, Log, Verdict, run_items
from tests.apps import app_env, run


def test_without_cuda_it_fails_in_one_clear_line():
    proc = run(
        [sys.executable, "-m", "scripts.gpu_check"], env=app_env(CUDA_VISIBLE_DEVICES="")
    )  # no device, on any machine
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpu_check: FAIL: no CUDA device visible")
    assert "Traceback" not in proc.stderr
    assert not list((REPO_ROOT / "results" / "gpu_check").glob(".*.partial"))


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_runner_keeps_limits_and_budget_and_saves_everything(tmp_path, capsys):
    checks = [
        Item("ok", python("print('first'); print('all good')"), 60),
        Item("broken", python("import sys; print('it broke'); sys.exit(3)"), 60),
        Item("slow", python("import time; print('started', flush=True); time.sleep(60)"), 2),
        Item("absent", python("pass"), 60, needs=("no_such_module_here",)),
    ]
    log = Log(tmp_path / "check.txt")
    verdicts = dict(run_items(checks, log, budget_s=600))
    assert verdicts["ok"].status == "PASS" and verdicts["ok"].line.startswith("all good")
    assert verdicts["broken"].status == "FAIL" and "it broke" in verdicts["broken"].line
    assert verdicts["broken"].line.startswith("exit status 3: ")
    assert (
        verdicts["slow"].status == "FAIL" and "stopped after 2 s: started" in verdicts["slow"].line
    )
    assert verdicts["absent"].status == "SKIP" and "no_such_module_here" in verdicts["absent"].line
    path = log.close()
    text = path.read_text()
    for expected in ("first", "it broke", "started", "----- slow: FAIL"):
        assert expected in text
    assert not list(tmp_path.glob(".*.partial"))
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed] == [
        ["ok", "PASS"],
        ["broken", "FAIL"],
        ["slow", "FAIL"],
        ["absent", "SKIP"],
    ]


def test_runner_skips_what_the_budget_cannot_hold(tmp_path):
    checks = [
        Item("first", python("import time; time.sleep(1)"), 60),
        Item("second", python("pass"), 60),
    ]
    verdicts = dict(run_items(checks, Log(tmp_path / "c.txt"), budget_s=gpu_check.MIN_ITEM_S + 0.5))
    assert verdicts["first"].status == "PASS"
    assert verdicts["second"] == Verdict("SKIP", verdicts["second"].line)
    assert "time budget spent" in verdicts["second"].line


def test_the_pytest_items_select_exactly_the_cuda_tests(tmp_path):
    """``-m cuda`` wins over the default ``-m 'not slow'`` of pyproject.toml: a slow CUDA
    test runs too; skips that merely name CUDA are not selected (GPU tests carry the marker)."""
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.cuda
            def test_marked():
                pass

            @pytest.mark.cuda
            @pytest.mark.slow
            def test_marked_and_slow():
                pass

            @pytest.mark.skipif(True, reason="needs scipy")
            def test_other_skip():
                pass

            def test_plain():
                pass
            """
        )
    )
    command = next(item.command for item in gpu_check.items(tmp_path) if item.name == "cuda_tests")
    assert command[-1] == "tests"
    collect = [*command[:-1], "--collect-only", "-c", str(REPO_ROOT / "pyproject.toml"),
               "--rootdir", str(tmp_path), str(tmp_path)]  # fmt: skip
    proc = run(collect)
    selected = sorted(line.split("::")[-1] for line in proc.stdout.splitlines() if "::" in line)
    assert selected == ["test_marked", "test_marked_and_slow"], proc.stdout + proc.stderr
    assert "2 deselected" in proc.stdout

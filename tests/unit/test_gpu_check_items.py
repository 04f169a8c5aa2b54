"""What the GPU check runs: the tests marked ``cuda``, one dry run per experiment of the
registry (an experiment added as one YAML file gets its dry run) and the benchmark last;
each judged by its exit status."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.core import registry
from experiments.pipelines import gpu_check
from experiments.pipelines.gpu_check import Verdict, judge


def test_unknown_item_is_refused_before_anything_runs():
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--only", "paths,nonsense"])
    assert stop.value.code == 2


def test_items_are_the_cuda_tests_a_dry_run_per_experiment_and_the_benchmark(tmp_path):
    checks = gpu_check.items(tmp_path)
    names = [item.name for item in checks]
    assert names[:3] == ["paths", "recompiles", "cuda_tests"] and names[-1] == "benchmark"
    assert names[3:-1] == list(registry.experiments())
    for item in checks[:3]:
        assert item.command[1:5] == ["-m", "pytest", "-m", "cuda"]
    for item in checks[3:-1]:
        app = registry.experiment(item.name).module
        assert item.command[1:] == [
            "-m",
            app,
            f"experiment={item.name}",
            "dry_run=true",
            "logger=none",
            f"hydra.run.dir={tmp_path / item.name}",
        ]
    assert checks[-1].command[1:3] == ["-m", "experiments.benchmark"]
    assert len(set(names)) == len(names)


def test_an_experiment_added_as_one_yaml_file_gets_its_dry_run(tmp_path, monkeypatch):
    source = registry.CONFIG_DIR / "experiment" / "mt_iwslt14_deen.yaml"
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mt_new_pair.yaml").write_text(source.read_text())
    monkeypatch.setattr(gpu_check, "experiments", lambda: registry.experiments(tmp_path))
    dry_runs = [item for item in gpu_check.items(Path("work")) if "dry_run=true" in item.command]
    assert [item.name for item in dry_runs] == ["mt_new_pair"]
    assert dry_runs[0].command[2:4] == ["experiments.translation", "experiment=mt_new_pair"]


def test_verdicts_follow_the_exit_status_and_quote_the_last_line():
    output = "collected 20 items\n\n==== 14 passed, 2 skipped, 380 deselected in 52.10s ====\n"
    assert judge(0, output) == Verdict("PASS", "14 passed, 2 skipped, 380 deselected in 52.10s")
    assert judge(1, "==== 1 failed, 13 passed in 9s ====") == Verdict(
        "FAIL", "exit status 1: 1 failed, 13 passed in 9s"
    )
    assert judge(5, "==== 396 deselected in 3.1s ====").status == "FAIL"
    assert judge(1, "Traceback\nRuntimeError: boom\n\n").line.endswith("boom")
    assert judge(0, "") == Verdict("PASS", "(no output)")

"""The mechanism study's report from results.json files alone: one label per normaliser
(the tables' label), its tables in study order, broken files reported and skipped."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments.core.results import RunResult
from experiments.pipelines.mechanism import study_report, study_stats


def _study_run(root: Path, options: dict, m: int, seed: int, error: float) -> None:
    name = options["name"]
    run_dir = root / f"{name}_{sorted(options.items())}_{m}_{seed}".replace(" ", "")
    run_dir.mkdir(parents=True)
    metrics = {}
    for n in (16, 64):
        metrics |= {f"N{n}/{k}": error + n / 1000 for k in study_stats.METRICS}
    RunResult(task="mechanism", dataset="synthetic_retrieval", model="retrieval",
              normalizer=name, output_normalizer="none", seed=seed, metric_name="task_error",
              metric_value=error, steps=20, wall_seconds=1.0, profile="smoke", metrics=metrics,
              config={"normalizer": options, "data": {"num_items": 16, "num_relevant": m},
                      "registry": {"table": "mechanism"}}).write(run_dir)  # fmt: skip


@pytest.fixture
def study(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed in (0, 1):
        _study_run(root, {"name": "multimax", "order": 2}, 2, seed, 0.3 + seed / 100)
        _study_run(root, {"name": "multimax", "order": 1}, 2, seed, 0.2 + seed / 100)
        _study_run(root, {"name": "softmax", "temperature": 1.0, "learn_temperature": True}, 2,
                   seed, 0.5)  # fmt: skip
        _study_run(root, {"name": "softmax", "temperature": 1.0}, 2, seed, 0.6 + seed / 100)
    return root


def test_runs_are_labelled_as_the_tables_label_them(study: Path) -> None:
    runs = study_stats.load_runs(study)
    assert study_stats.normalizers_in(runs) == [
        "softmax",
        "softmax(learn_temperature=True)",
        "multimax(order=1)",
        "multimax",
    ]
    assert {r["eval_n"] == [16, 64] and r["train_n"] == 16 for r in runs} == {True}


def test_report_tables_from_the_runs(study: Path, tmp_path: Path, capsys) -> None:
    broken = study / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_text("{")
    out = tmp_path / "report"
    study_report.report(study, out)
    assert str(broken) in capsys.readouterr().err
    with (out / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["normalizer"] for r in summary][:1] == ["softmax"]
    assert summary[-1]["normalizer"] == "multimax" and summary[-1]["seeds"] == "0 1"
    assert summary[-1]["task_error"] == "0.321 ± 0.007"  # N16: error + 0.016, two seeds
    md = (out / "summary.md").read_text().splitlines()
    assert md[0].startswith("SMOKE RESULTS") and md[3] == "|" + "---|" * 10
    versus = (out / "multimax_vs_others.md").read_text()
    assert "| multimax(order=1) | softmax | task_error |" in versus
    assert (out / "error_residual_vs_n.png").stat().st_size > 10_000

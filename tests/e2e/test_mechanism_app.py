"""The mechanism app end to end: a real (tiny) Hydra multirun that writes results.json and
regenerates the study report, and a rerun of a finished run that changes nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from experiments.core.io import REPO_ROOT as REPO
from experiments.core.results import METRICS_LOG, read_results


def test_tiny_multirun_writes_results_and_report(tmp_path: Path) -> None:
    """Two normalisers through the real Hydra app (-m), then the study report from them."""
    from experiments.pipelines.mechanism.study import report

    sweep = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.mechanism",
            "-m",
            "experiment=mechanism_retrieval",
            "profile=smoke",
            "logger=none",
            "normalizer=softmax,multimax",
            "seed=0",
            "train.steps=20",
            "train.log_every=10",
            "eval.num_items=[16,32]",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    paths = sorted(sweep.rglob("results.json"))
    assert len(paths) == 2
    for path in paths:
        result = read_results(path)
        assert result.task == "mechanism" and result.metric_name == "task_error"
        assert result.profile == "smoke" and result.steps == 20
        assert result.normalizer in {"softmax", "multimax"}
        assert result.output_normalizer == "none"
        curve = (path.parent / METRICS_LOG).read_text().splitlines()
        assert json.loads(curve[-1])["step"] == 20  # the training curve reaches the last step
        assert math.isfinite(result.metric_value)
        assert (
            result.metric_value == result.metrics["task_error"] == result.metrics["N32/task_error"]
        )
        for n in (16, 32):
            assert 0.0 <= result.metrics[f"N{n}/residual_mass"] <= 1.0
            assert 0.0 < result.metrics[f"N{n}/modes_kept"] <= 1.0
        inspect = json.loads(path.with_name("inspect.json").read_text())
        assert len(inspect["attention"][0][0]) == 32
        if result.normalizer == "multimax":
            assert len(inspect["normalizer_parameters"]["high_coef"]) == 2

    out = tmp_path / "report"
    report(sweep, out)
    for name in ("summary", "by_eval_n", "multimax_vs_others"):
        assert (out / f"{name}.csv").exists() and "SMOKE" in (out / f"{name}.md").read_text()
    for name in ("error_residual_vs_n", "modes_kept_vs_m", "sigma_learned", "attention_rows"):
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert (out / f"{name}.pdf").exists()
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2  # header + one row per normaliser (one m)
    assert all(row.split(",")[3] == "0" for row in summary[1:])  # seeds


def test_rerun_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.mechanism", "experiment=mechanism_retrieval",
               "profile=smoke", "logger=none", "normalizer=softmax", "train.steps=20",
               "train.log_every=10", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "holds a finished run" in again.stdout
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files

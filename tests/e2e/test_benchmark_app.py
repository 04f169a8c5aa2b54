"""The benchmark app runs end to end on tiny shapes and writes its report and results."""

import json
import re

import torch

from tests.apps import run_app


def test_benchmark_app_writes_report_and_results(tmp_path):
    overrides = [
        "~attention.shapes.lm",
        "attention.shapes.deit_small.batch=2",
        "attention.shapes.deit_small.heads=2",
        "attention.shapes.deit_small.tokens=12",
        "attention.shapes.deit_small.head_dim=8",
        "scaling.tokens=[8,16]",
        "scaling.shape.heads=2",
        "scaling.shape.head_dim=8",
        "~output_layer.cases.v267k",
        "~output_layer.cases.v267k_t512",
        "output_layer.cases.v50k.tokens=8",
        "output_layer.cases.v50k.vocab=50",
        "output_layer.dim=16",
        "models.deit_small.enabled=false",
        "models.lm.tokens=8",
        "models.lm.dim=16",
        "models.lm.heads=2",
        "models.lm.vocab=50",
        "repeats=2",
        "scaling.repeats=2",
        "output_layer.repeats=2",
        "models.repeats=2",
        "warmup=1",
        f"out_dir={tmp_path / 'results'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = run_app("benchmark", overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "results" / "speed_cpu.md").read_text()
    assert f"torch {torch.__version__}" in report
    assert "threads" in report and "machine:" in report and "load average" in report
    for row in ("softmax/sdpa", "multimax/authors-torchscript", "multimax/auto", "lm/multimax",
                "multimax/standard", "multimax/fused"):  # fmt: skip
        assert f"| {row} |" in report
    assert "| output layer time, 8 tokens × 50 vocabulary" in report
    assert "## Scaling with the sequence length" in report and "\n| 16 | " in report
    assert re.search(
        r"\| attention fwd\+bwd time, deit_small .* \| [0-9.]+ \[[0-9.]+–[0-9.]+\] \|", report
    )
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["task"] == "benchmark" and result["metric_value"] > 0

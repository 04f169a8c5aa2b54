"""The benchmark app runs end to end on tiny shapes and writes its report; its memory
measurement sees real allocations."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from experiments.benchmark import authors_sigma, peak_bytes
from multimax import build_normalizer

REPO = Path(__file__).resolve().parents[1]


def test_config_composes_with_the_issue_shapes_and_rows():
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("benchmark")
    assert cfg.task == "benchmark"
    shape = cfg.attention.shapes.deit_small
    assert (shape.batch, shape.heads, shape.tokens, shape.head_dim) == (16, 6, 196, 64)
    assert (cfg.output_layer.tokens, cfg.output_layer.vocab) == (2048, 50000)
    assert cfg.repeats >= 10 and cfg.output_layer.repeats >= 10 and cfg.models.repeats >= 10
    assert {"softmax/sdpa", "softmax/eager", "multimax/authors-eager"} <= set(cfg.attention.rows)


def test_authors_sigma_is_the_formula():
    m = build_normalizer("multimax", order=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(50)
    torch.testing.assert_close(authors_sigma(x, *m.sigma_parameters()), m.modulate(x))


def test_peak_bytes_measures_cpu_allocations():
    def allocate():
        a = torch.empty(4 * 2**20, dtype=torch.uint8)
        b = torch.empty(2 * 2**20, dtype=torch.uint8)
        del a, b

    peak = peak_bytes(allocate, torch.device("cpu"))
    assert 6 * 2**20 <= peak < 7 * 2**20


def test_benchmark_app_writes_report_and_results(tmp_path):
    overrides = [
        "~attention.shapes.lm",
        "attention.shapes.deit_small.batch=2",
        "attention.shapes.deit_small.heads=2",
        "attention.shapes.deit_small.tokens=12",
        "attention.shapes.deit_small.head_dim=8",
        "output_layer.tokens=8",
        "output_layer.vocab=50",
        "models.deit_small.enabled=false",
        "models.lm.tokens=8",
        "models.lm.dim=16",
        "models.lm.heads=2",
        "models.lm.vocab=50",
        "repeats=2",
        "output_layer.repeats=2",
        "models.repeats=2",
        "warmup=1",
        f"out_dir={tmp_path / 'results'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "results" / "speed_cpu.md").read_text()
    assert f"torch {torch.__version__}" in report
    assert "threads" in report and "machine:" in report
    for row in ("softmax/sdpa", "multimax/authors-torchscript", "multimax/auto", "lm/multimax"):
        assert f"| {row} |" in report
    assert "| output layer σ+CE time" in report
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["task"] == "benchmark" and result["metric_value"] > 0

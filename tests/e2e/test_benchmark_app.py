"""The benchmark app runs end to end on tiny shapes and writes its report; its memory
measurement sees real allocations."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from experiments.pipelines.benchmark.measure import authors_sigma, peak_bytes
from multimax import build_normalizer

REPO = Path(__file__).resolve().parents[1]


def test_config_composes_with_the_issue_shapes_and_rows():
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("benchmark")
    assert cfg.task == "benchmark"
    shape = cfg.attention.shapes.deit_small
    assert (shape.batch, shape.heads, shape.tokens, shape.head_dim) == (16, 6, 197, 64)
    lm = cfg.attention.shapes.lm
    assert (lm.batch, lm.heads, lm.tokens, lm.head_dim, lm.causal) == (2, 8, 2048, 64, True)
    assert list(cfg.scaling.tokens) == [256, 512, 1024, 2048, 4096] and cfg.scaling.shape.causal
    cases = {(c.tokens, c.vocab) for c in cfg.output_layer.cases.values()}
    assert {(4096, 50000), (4096, 267744)} <= cases and cfg.output_layer.dim == 512
    rounds = [cfg.repeats, lm.repeats, cfg.scaling.repeats, cfg.output_layer.repeats]
    assert min([*rounds, cfg.models.repeats]) >= 5  # the issue: at least 5 interleaved rounds
    assert {"softmax/sdpa", "softmax/eager", "multimax/authors-eager"} <= set(cfg.attention.rows)
    assert {"multimax/standard", "multimax/fused"} <= set(cfg.output_layer.rows)


def test_ratios_are_taken_within_rounds_and_reported_as_median_and_range():
    """A load spike in one round slows every row of that round: the per-round ratio stays
    put, and the range shows the rounds' spread."""
    from experiments.pipelines.benchmark.measure import Row, Spread, Target, round_ratios

    ref = Row("softmax/sdpa", "softmax", None, None)
    row = Row("multimax/auto", "multimax", None, None)
    ref.times["fwd"] = [1.0, 10.0, 1.0, 1.0, 2.0]
    row.times["fwd"] = [1.1, 11.0, 1.3, 1.0, 2.4]
    spread = round_ratios(row, ref, "fwd")
    assert spread == Spread(1.1, 1.0, 1.3)
    assert str(spread) == "1.10 [1.00–1.30]"
    assert Target("t", spread, 1.15).line() == "| t | 1.10 [1.00–1.30] | ≤ 1.15 | yes |"
    assert Target("t", spread, 1.05).line().endswith("| no |")  # judged on the median
    assert Target("m", 0.5, 0.3).line() == "| m | 0.50 | ≤ 0.3 | no |"


def test_readme_quotes_the_targets_of_the_committed_report():
    """README's speed table is the targets table of results/speed_cpu.md, row for row."""
    report = (REPO / "results" / "speed_cpu.md").read_text()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Speed") : readme.index("## Mechanism study")]
    quoted = [line for line in section.splitlines() if line.startswith("| ")]
    targets = report[report.index("## Targets") :].split("\n## ")[0]
    assert quoted and all(line in targets.splitlines() for line in quoted)
    assert "median" in section and "load average" in section


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

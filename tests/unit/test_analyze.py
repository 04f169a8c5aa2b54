"""experiments/pipelines/report/attention_stats.py: measurements on any nn.Module and figures from run directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import multimax
from experiments.core.results import RunResult
from experiments.core.tracking import log_metrics
from experiments.pipelines.report import attention_stats, figures, plots


class TinyAttentionModel(nn.Module):
    """Two self-attention layers over a 4x4 patch grid, each with its own normaliser."""

    def __init__(self, normalizers: list[str], dim: int = 8, causal: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in normalizers)
        self.normalizers = nn.ModuleList(multimax.build_normalizer(n) for n in normalizers)
        self.head = multimax.MultiMax(order=1)
        self.causal = causal

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images.flatten(2).transpose(1, 2))  # (B, 16, dim) from (B, 3, 4, 4)
        for qkv, norm in zip(self.qkv, self.normalizers, strict=True):
            q, k, v = qkv(x).unsqueeze(1).chunk(3, dim=-1)
            x = x + multimax.attention(q, k, v, norm, is_causal=self.causal).squeeze(1)
        return self.head(x.mean(1))


@pytest.fixture
def model() -> TinyAttentionModel:
    torch.manual_seed(0)
    return TinyAttentionModel(["softmax", "sparsemax"])


def test_layer_statistics_per_layer(model: TinyAttentionModel) -> None:
    batches = [torch.randn(5, 3, 4, 4) * 4, (torch.randn(3, 3, 4, 4) * 4, torch.zeros(3))]
    stats = attention_stats.layer_statistics(model, batches)
    assert len(stats) == 2 and set(stats[0]) == {k for k, _ in attention_stats.STATISTICS}
    assert stats[0]["share_zeros"] == 0.0  # softmax is never exactly zero
    assert stats[1]["share_zeros"] > 0.1  # sparsemax is
    assert stats[1]["entropy"] < stats[0]["entropy"]


def test_causal_layers_do_not_count_masked_entries_as_zeros() -> None:
    torch.manual_seed(0)
    causal = TinyAttentionModel(["softmax"], causal=True)
    (stats,) = attention_stats.layer_statistics(causal, [torch.randn(2, 3, 4, 4)])
    assert stats["share_zeros"] == 0.0


def test_no_recorded_attention_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no multimax.attention call"):
        attention_stats.layer_statistics(nn.Linear(3, 3), [torch.randn(2, 3)])


def test_sigma_curves_of_every_multimax_module() -> None:
    m = TinyAttentionModel(["multimax", "softmax", "multimax"])
    with torch.no_grad():
        for p in m.normalizers[0].sigma_parameters():
            p.zero_()
        m.normalizers[0].low_coef[0] = -2.0  # slope 3 below b = 0, identity above
    curves = attention_stats.sigma_curves(m)
    assert [name for name, _, _ in curves] == ["normalizers.0", "normalizers.2", "head"]
    name, x, y = curves[0]
    assert x.min() <= -6 and x.max() >= 6
    torch.testing.assert_close(y, m.normalizers[0].modulate(x).detach())
    assert float(y[0]) == pytest.approx(3 * float(x[0]), rel=1e-2)


def test_attention_maps_on_the_patch_grid(model: TinyAttentionModel) -> None:
    maps = attention_stats.attention_maps(model, torch.randn(3, 3, 4, 4))
    assert maps.shape == (3, 4, 4)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(3))  # mean of rows on the simplex


def _fake_run(root: Path, normalizer: str, seed: int, losses: list[float]) -> Path:
    run_dir = root / f"{normalizer}_{seed}"
    for step, loss in enumerate(losses):
        log_metrics(run_dir, step * 10, {"train/loss": loss, "lr": 1e-3})
    log_metrics(run_dir, 30, {"val/top1": 50.0 + seed})
    RunResult(task="toy", dataset="d", model="tiny", normalizer=normalizer,
              output_normalizer=normalizer, seed=seed, metric_name="val_top1",
              metric_value=50.0, steps=30, wall_seconds=1.0, profile="smoke").write(run_dir)  # fmt: skip
    return run_dir


def test_training_curves_and_report(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _fake_run(runs, "softmax", 0, [2.0, 1.5, 1.0])
    _fake_run(runs, "multimax", 0, [2.0, 1.2, 0.8])
    broken = runs / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_text("{")
    out = tmp_path / "figures"
    made = figures.analyze_runs([runs], out)
    assert len(made) == 1
    png = out / "training_curves_toy_smoke.png"
    assert (out / "training_curves_toy_smoke.pdf").stat().st_size > 1000
    with Image.open(png) as image:
        assert image.size[0] > 600
    report = (out / "figures.md").read_text()
    assert "![training_curves_toy_smoke](training_curves_toy_smoke.png)" in report
    assert "*Figure 1.* Training curves of the toy runs [SMOKE RUNS]" in report
    assert str(broken) in report


def test_plots_have_labelled_axes(model: TinyAttentionModel) -> None:
    stats = {"softmax": attention_stats.layer_statistics(model, [torch.randn(2, 3, 4, 4)])}
    fig = plots.plot_layer_statistics(stats, "t")
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes if ax.get_visible())
    fig = plots.plot_sigma_curves({"m": attention_stats.sigma_curves(model)}, "t")
    assert fig.axes[0].get_xlabel() == "score x" and fig.axes[0].get_ylabel() == "σ(x)"
    images = torch.randn(2, 3, 4, 4)
    fig = plots.plot_attention_maps(images, {"softmax": attention_stats.attention_maps(model, images)},
                                      "t")  # fmt: skip
    assert fig.axes[0].get_title() == "input"
    json.dumps(stats)  # plain floats

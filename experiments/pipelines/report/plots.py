"""The figures of ``experiments.analyze``: attention statistics per layer, learned σ curves,
attention maps over images and training curves; each saved as PNG and PDF."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import turns on DEBUG
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from experiments.pipelines.report.attention_stats import STATISTICS  # noqa: E402


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """``stem``.png and ``stem``.pdf."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _panels(n: int, width: float = 4.0, height: float = 3.4, max_cols: int = 3):
    """A figure with ``n`` panels in rows of at most ``max_cols``; unused panels hidden."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_layer_statistics(stats: Mapping[str, Sequence[Mapping[str, float]]], title: str):
    """One panel per statistic, layer on x, one line per normaliser."""
    fig, axes = _panels(len(STATISTICS))
    for ax, (key, label) in zip(axes, STATISTICS, strict=True):
        for name, layers in stats.items():
            ax.plot(range(1, len(layers) + 1), [s[key] for s in layers], marker="o", label=name)
        ax.set_xlabel("attention layer (call order)")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sigma_curves(curves: Mapping[str, Sequence[tuple[str, Tensor, Tensor]]], title: str):
    """One panel per model with MultiMax modules: σ(x) of each module against y = x."""
    fig, axes = plt.subplots(1, len(curves), figsize=(7.5 * len(curves), 4), squeeze=False)
    for ax, (name, layers) in zip(axes[0], curves.items(), strict=True):
        cmap = plt.get_cmap("viridis", max(len(layers), 2))
        for i, (module, x, y) in enumerate(layers):
            ax.plot(x, y, color=cmap(i), label=module)
        x = layers[0][1]
        ax.plot(x, x, "k--", linewidth=1, label="identity (softmax)")
        ax.set_xlabel("score x")
        ax.set_ylabel("σ(x)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside, not over
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_attention_maps(
    images: Tensor,
    maps: Mapping[str, Tensor],
    title: str,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
):
    """Rows: images; columns: the image, then each normaliser's map over it."""
    n = images.shape[0]
    fig, axes = plt.subplots(n, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.2 * n),
                             squeeze=False)  # fmt: skip
    pixels = images.float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1)
    extent = (0, images.shape[-1], images.shape[-2], 0)
    for i in range(n):
        axes[i, 0].imshow(pixels[i], extent=extent)
        axes[i, 0].set_ylabel(f"image {i}")
        for j, (name, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(pixels[i], extent=extent)
            shown = axes[i, j].imshow(m[i], cmap="inferno", alpha=0.6, extent=extent)
            fig.colorbar(shown, ax=axes[i, j], fraction=0.046)
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=9)
    axes[-1, 0].set_xlabel("pixels (map: attention received per patch)", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(runs: Sequence[tuple[str, list[dict[str, float]]]], title: str):
    """One panel per logged metric (steps on x), one line per run."""
    skip = {"step", "epoch"}
    keys = sorted({k for _, recs in runs for r in recs for k in r if k not in skip},
                  key=lambda k: ("loss" not in k, k == "lr", k))  # fmt: skip
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for name, recs in runs:
            points = [(r["step"], r[key]) for r in recs if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

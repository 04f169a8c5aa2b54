"""Figures from runs: what the trained normalisers do, regenerated from run directories.

    python -m experiments.analyze RUNS_DIR... --out results/figures

For every run directory (one holding a ``results.json``) under the given paths:

* training curves from its ``metrics.jsonl`` (one figure per task and profile);
* for runs whose task has a model loader (vision: ``experiments.pipelines.vision.trained.load_trained_model``)
  and a checkpoint, per model and profile, one seed per normaliser:
  - per-layer attention statistics on evaluation data (sparsity: share of weights < 1e-3
    and exact zeros; multi-modality: modes ≥ 0.5·max and second / first weight; entropy),
    from ``multimax.record_attention()`` around forward passes;
  - the learned σ of every ``multimax.MultiMax`` module against the identity;
  - attention maps on a few evaluation images (last layer, mean over heads and queries).

Every figure is written as PNG and PDF, and ``figures.md`` in ``--out`` lists them, each
with a caption line. The functions below work on any ``nn.Module`` whose attention goes
through ``multimax.attention``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import turns on DEBUG
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import multimax  # noqa: E402
from experiments.core.io import REPO_ROOT, atomic_write_text  # noqa: E402
from experiments.core.results import METRICS_LOG, RESULTS_FILE  # noqa: E402
from multimax.metrics import attention_statistics  # noqa: E402

STATISTICS = (
    ("share_below", "share of weights < 1e-3"),
    ("share_zeros", "share of exact zeros"),
    ("num_modes", "modes (p ≥ 0.5·max)"),
    ("second_mode_ratio", "2nd / 1st largest weight"),
    ("entropy", "entropy (nats)"),
)


# --- measurements on a model ------------------------------------------------------------------


def _forward(model: nn.Module, batch: Any) -> Any:
    """Inputs are a tensor, an (inputs, targets) pair or a dict of keyword arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def record_layers(model: nn.Module, batches: Iterable[Any]) -> list[list[Tensor]]:
    """Attention weights (B, H, N, M) of every attention call, per batch, in layer order."""
    recorded = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            with multimax.record_attention() as weights:
                _forward(model, batch)
            if not weights:
                raise RuntimeError(
                    f"{type(model).__name__} made no multimax.attention call: its attention "
                    "layers do not go through multimax, so there is nothing to record"
                )
            recorded.append([w.float().cpu() for w in weights])
    return recorded


def _causal_mask(w: Tensor) -> Tensor | None:
    """A lower-triangular mask when the weights are exactly zero above the diagonal
    (a causal layer), so that the masked entries do not count as sparsity."""
    n, m = w.shape[-2:]
    if n != m or n < 2 or bool(torch.triu(w, diagonal=1).any()):
        return None
    return torch.ones(n, m, dtype=torch.bool).tril()


def layer_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    threshold: float = 1e-3,
    rel_threshold: float = 0.5,
) -> list[dict[str, float]]:
    """Per attention layer, :func:`multimax.metrics.attention_statistics` averaged over the
    batches (weighted by rows)."""
    sums: list[dict[str, float]] = []
    rows: list[int] = []
    for weights in record_layers(model, batches):
        for i, w in enumerate(weights):
            stats = attention_statistics(w, _causal_mask(w), threshold, rel_threshold)
            count = w[..., 0].numel()
            if i == len(sums):
                sums.append(dict.fromkeys(stats, 0.0))
                rows.append(0)
            for key, value in stats.items():
                sums[i][key] += value * count
            rows[i] += count
    return [{k: v / n for k, v in s.items()} for s, n in zip(sums, rows, strict=True)]


def sigma_curves(model: nn.Module, x: Tensor | None = None) -> list[tuple[str, Tensor, Tensor]]:
    """(module name, x, σ(x)) for every :class:`multimax.MultiMax` module of ``model``; the
    default x spans [-6, 6] widened to 2 past every threshold."""
    curves = []
    for name, module in model.named_modules():
        if not isinstance(module, multimax.MultiMax):
            continue
        grid = x
        if grid is None:
            t = torch.cat([module.low_threshold, module.high_threshold]).detach().float()
            lo, hi = min(-6.0, float(t.min()) - 2), max(6.0, float(t.max()) + 2)
            grid = torch.linspace(lo, hi, 401)
        with torch.no_grad():
            y = module.modulate(grid.to(module.low_threshold.dtype))
        curves.append((name or type(model).__name__, grid.float(), y.float()))
    return curves


def attention_maps(model: nn.Module, images: Tensor, layer: int = -1) -> Tensor:
    """(B, h, w): the attention each patch receives in ``layer`` (mean over heads and
    queries), on the patch grid; the key tokens must form a square grid (no class token)."""
    (weights,) = record_layers(model, [images])
    w = weights[layer].mean(dim=(1, 2))  # (B, M)
    side = math.isqrt(w.shape[-1])
    if side * side != w.shape[-1]:
        raise ValueError(f"{w.shape[-1]} key tokens do not form a square patch grid")
    return w.reshape(-1, side, side)


def read_metrics_log(run_dir: str | Path) -> list[dict[str, float]]:
    """The records of ``metrics.jsonl`` (an unreadable last line, from a killed run, is
    dropped)."""
    path = Path(run_dir) / METRICS_LOG
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --- figures ----------------------------------------------------------------------------------


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


# --- runs -> figures ----------------------------------------------------------------------------


@dataclass
class AnalysedRun:
    """What a model loader gives: the model, evaluation batches and a few images."""

    model: nn.Module
    batches: list[Any]
    images: Tensor | None = None
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)


def _load_vision(run_dir: Path, num_images: int = 64, batch_size: int = 32) -> AnalysedRun:
    """A vision run's model, ``num_images`` validation images spread evenly over the
    (class-sorted) split, and 4 of them, far apart, for the attention maps."""
    from torch.utils.data import DataLoader, Subset

    from experiments.pipelines.vision.data import build_datasets
    from experiments.pipelines.vision.trained import load_trained_model

    model, cfg = load_trained_model(run_dir)
    _, val = build_datasets(cfg)
    index = torch.linspace(0, len(val) - 1, min(num_images, len(val))).long().tolist()
    loader = DataLoader(Subset(val, index), batch_size=batch_size, shuffle=False)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    picks = torch.linspace(0, len(images) - 1, 4).long()
    return AnalysedRun(model, batches, images[picks], cfg.data.mean, cfg.data.std)


def _load_fairseq(run_dir: Path, num_batches: int = 4, max_tokens: int = 1024) -> AnalysedRun:
    """A fairseq run's best checkpoint (through the plugin) and the first batches of its
    validation split; fairseq's ``net_input`` dicts are the model's keyword arguments."""
    import argparse

    from fairseq import checkpoint_utils, utils

    from multimax.integrations.fairseq_checkpoints import load_fairseq_checkpoint

    logging.getLogger("fairseq").setLevel(logging.WARNING)  # its INFO lines drown ours
    plugin = Path(multimax.__file__).parent / "integrations" / "fairseq_plugin"
    utils.import_user_module(argparse.Namespace(user_dir=str(plugin)))
    checkpoints = run_dir / "checkpoints"
    path = next((checkpoints / n for n in ("checkpoint_best.pt", "checkpoint_last.pt")
                 if (checkpoints / n).exists()), None)  # fmt: skip
    if path is None:
        raise FileNotFoundError(f"no fairseq checkpoint in {checkpoints}")
    data = Path(load_fairseq_checkpoint(str(path))["cfg"]["task"]["data"])
    if not data.is_absolute() and not data.exists():
        data = REPO_ROOT / data  # relative to the repository
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data)}
    )
    task.load_dataset("valid")
    batches = task.get_batch_iterator(
        task.dataset("valid"), max_tokens=max_tokens, max_sentences=16, seed=0
    ).next_epoch_itr(shuffle=False)
    inputs = [sample["net_input"] for _, sample in zip(range(num_batches), batches)]
    return AnalysedRun(models[0].eval(), inputs)


# task -> loader of a trained run
MODEL_LOADERS: dict[str, Callable[[Path], AnalysedRun]] = {
    "image_classification": _load_vision,
    "language_model": _load_fairseq,
    "translation": _load_fairseq,
}


@dataclass
class Figure:
    stem: Path
    caption: str
    files: list[Path] = field(default_factory=list)


def _label(result: Mapping[str, Any]) -> str:
    attn, out = result["normalizer"], result["output_normalizer"]
    return attn if out in (attn, "none") else f"{attn}/{out}"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def find_runs(paths: Iterable[str | Path]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(run dir, results.json contents) of every readable run under ``paths``, and problems."""
    runs, problems = [], []
    for root in map(Path, paths):
        for path in sorted(root.rglob(RESULTS_FILE)) if root.is_dir() else []:
            try:
                data = json.loads(path.read_text())
                _ = data["task"], data["model"], data["normalizer"], data["output_normalizer"]
                runs.append((path.parent, data))
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                problems.append(f"{path}: skipped ({err})")
    return runs, problems


def analyze_runs(paths: Sequence[str | Path], out: str | Path) -> list[Figure]:
    """Write every figure the runs under ``paths`` allow into ``out``, and ``figures.md``."""
    out = Path(out)
    runs, problems = find_runs(paths)
    for line in problems:
        print(f"[analyze] {line}", file=sys.stderr)
    figures: list[Figure] = []

    curves: dict[tuple[str, str], list] = defaultdict(list)
    for run_dir, res in runs:
        records = read_metrics_log(run_dir)
        if records:
            name = f"{_label(res)} seed{res.get('seed', 0)}"
            curves[(res["task"], res.get("profile", "paper"))].append((name, records))
    for (task, profile), series in sorted(curves.items()):
        tag = "" if profile == "paper" else f" [{profile.upper()} RUNS]"
        fig = Figure(
            out / f"training_curves_{_slug(task)}_{profile}",
            f"Training curves of the {task} runs{tag}: every metric the runs logged to "
            f"metrics.jsonl against the optimiser step, one line per run ({len(series)} runs).",
        )
        fig.files = save_figure(plot_training_curves(series, f"{task}{tag}"), fig.stem)
        figures.append(fig)

    chosen: dict[tuple[str, str, str], dict[str, Path]] = defaultdict(dict)
    for run_dir, res in sorted(runs, key=lambda r: (r[1].get("seed", 0), str(r[0]))):
        if res["task"] in MODEL_LOADERS:
            key = (res["task"], res.get("profile", "paper"), res["model"])
            chosen[key].setdefault(_label(res), run_dir)  # the lowest seed per normaliser
    for (task, profile, model_name), by_label in sorted(chosen.items()):
        figures += _model_figures(task, profile, model_name, by_label, out)

    report = ["# Figures", "", "Generated by `python -m experiments.analyze`; do not edit.", ""]
    for i, fig in enumerate(figures, start=1):
        png = fig.stem.with_suffix(".png").name
        report += [f"![{fig.stem.name}]({png})", "", f"*Figure {i}.* {fig.caption}", ""]
    if problems:
        report += ["## Skipped", ""] + [f"- {p}" for p in problems] + [""]
    atomic_write_text(out / "figures.md", "\n".join(report))
    print(f"[analyze] {len(figures)} figures from {len(runs)} runs in {out}")
    return figures


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _model_figures(
    task: str, profile: str, model_name: str, by_label: Mapping[str, Path], out: Path
) -> list[Figure]:
    tag = "" if profile == "paper" else f" [{profile.upper()} RUNS]"
    stem = f"{_slug(model_name)}_{profile}"
    stats, sigmas, maps = {}, {}, {}
    images, mean, std, n_inputs = None, (0.5,) * 3, (0.5,) * 3, 0
    for label, run_dir in sorted(by_label.items(), key=lambda kv: kv[0] != "softmax"):
        print(f"[analyze] {model_name} {label}: {run_dir}", flush=True)
        try:
            loaded = MODEL_LOADERS[task](run_dir)
            stats[label] = layer_statistics(loaded.model, loaded.batches)
        except Exception as err:  # noqa: BLE001 - one unreadable run must not stop the others
            print(f"[analyze] {run_dir}: no model to analyse ({err})", file=sys.stderr)
            continue
        n_inputs = sum(_batch_size(b) for b in loaded.batches)
        if curves := sigma_curves(loaded.model):
            sigmas[label] = curves
        if loaded.images is not None:
            images = loaded.images if images is None else images
            mean, std = loaded.mean, loaded.std
            maps[label] = attention_maps(loaded.model, images)
    figures = []
    if stats:
        fig = Figure(
            out / f"attention_statistics_{stem}",
            f"Per-layer attention statistics of {model_name}{tag} on {n_inputs} evaluation "
            "inputs (attention calls in layer order; causal masks excluded, padding, if "
            "any, counted as zeros), one line per normaliser: sparsity (share of weights "
            "below 1e-3; share of exact zeros), multi-modality (entries with at least half the row's largest "
            "weight; second over first largest weight) and entropy, averaged over heads and "
            "query rows.",
        )
        title = f"{model_name}{tag}: attention statistics per layer"
        fig.files = save_figure(plot_layer_statistics(stats, title), fig.stem)
        figures.append(fig)
    if sigmas:
        fig = Figure(
            out / f"sigma_curves_{stem}",
            f"Learned σ of every MultiMax module of {model_name}{tag} (attention layers in "
            "order and the output layer), against the identity that plain softmax applies: "
            "slope above 1 below the low threshold means sparser, slope below 1 above the "
            "high threshold means large scores share mass.",
        )
        title = f"{model_name}{tag}: learned σ"
        fig.files = save_figure(plot_sigma_curves(sigmas, title), fig.stem)
        figures.append(fig)
    if maps and images is not None:
        fig = Figure(
            out / f"attention_maps_{stem}",
            f"Attention maps of {model_name}{tag} on {images.shape[0]} evaluation images: the "
            "attention each patch receives in the last layer (mean over heads and queries), "
            "one column per normaliser.",
        )
        title = f"{model_name}{tag}: last-layer attention"
        fig.files = save_figure(plot_attention_maps(images, maps, title, mean, std), fig.stem)
        figures.append(fig)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories (searched recursively)")
    parser.add_argument("--out", default="results/figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    analyze_runs(args.run_dirs, args.out)
    return 0

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
with a caption line. The measurements (``report.attention_stats``) work on any ``nn.Module``
whose attention goes through ``multimax.attention``; the plots are in ``report.plots``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import multimax
from experiments.core.io import REPO_ROOT, atomic_write_text
from experiments.core.results import METRICS_LOG
from experiments.pipelines.report.attention_stats import (
    attention_maps,
    layer_statistics,
    sigma_curves,
)
from experiments.pipelines.report.plots import (
    plot_attention_maps,
    plot_layer_statistics,
    plot_sigma_curves,
    plot_training_curves,
    save_figure,
)
from experiments.pipelines.report.runs import FoundRun, load_runs, run_label
from experiments.pipelines.vision.data import build_datasets
from experiments.pipelines.vision.trained import load_trained_model


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

    # the vision pipeline (timm, torchvision): loaded only for runs of that task
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
    from fairseq import checkpoint_utils, utils  # heavy: only runs of a fairseq task need it

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


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _by_seed(run: FoundRun) -> tuple:
    return (run.result.seed, str(run.run_dir))


def analyze_runs(paths: Sequence[str | Path], out: str | Path) -> list[Figure]:
    """Write every figure the runs under ``paths`` allow into ``out``, and ``figures.md``."""
    out = Path(out)
    runs, problems = load_runs(paths)
    for line in problems:
        print(f"[analyze] {line}", file=sys.stderr)
    figures: list[Figure] = []

    curves: dict[tuple[str, str], list] = defaultdict(list)
    for run in runs:
        records = read_metrics_log(run.run_dir)
        if records:
            name = f"{run_label(run.result)} seed{run.result.seed}"
            curves[(run.result.task, run.result.profile)].append((name, records))
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
    for run in sorted(runs, key=_by_seed):
        res = run.result
        if res.task in MODEL_LOADERS:
            key = (res.task, res.profile, res.model)
            chosen[key].setdefault(run_label(res), run.run_dir)  # the lowest seed per normaliser
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
    try:
        analyze_runs(args.run_dirs, args.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    return 0

"""Measurements on any ``nn.Module`` whose attention goes through ``multimax.attention``:
per-layer attention statistics (sparsity, multi-modality, entropy) recorded with
``multimax.record_attention()``, the learned σ of every ``multimax.MultiMax`` module, and
attention maps over a patch grid."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

import multimax
from multimax.metrics import attention_statistics

STATISTICS = (
    ("share_below", "share of weights < 1e-3"),
    ("share_zeros", "share of exact zeros"),
    ("num_modes", "modes (p ≥ 0.5·max)"),
    ("second_mode_ratio", "2nd / 1st largest weight"),
    ("entropy", "entropy (nats)"),
)


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

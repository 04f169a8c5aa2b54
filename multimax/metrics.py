"""Diagnostics of attention / output distributions, batched over rows, and the
ε-perplexity of output distributions that can give a token probability exactly 0.

Every function takes probabilities ``p`` of shape (..., M) whose last dimension is one
distribution (a row) and returns one value per row, shape (...). ``mask`` (bool, True =
valid, broadcastable to ``p``) restricts a row to its valid entries (padding excluded).
:func:`attention_statistics` averages them over rows into plain floats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _valid(p: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones_like(p, dtype=torch.bool)
    return mask.to(torch.bool).expand_as(p)


def share_below(p: Tensor, threshold: float = 1e-3, mask: Tensor | None = None) -> Tensor:
    """Sparsity: the share of valid entries with p_i < threshold (absolute), in [0, 1]."""
    valid = _valid(p, mask)
    count = valid.sum(-1).clamp_min(1)
    return ((p < threshold) & valid).sum(-1) / count


def share_zeros(p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Exact sparsity: the share of valid entries with p_i == 0 exactly, in [0, 1]."""
    valid = _valid(p, mask)
    count = valid.sum(-1).clamp_min(1)
    return ((p == 0) & valid).sum(-1) / count


def num_modes(p: Tensor, rel_threshold: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """Multi-modality: the number of valid entries holding at least ``rel_threshold`` times
    the row's largest weight, p_i >= r · max_j p_j (the largest counts; 0 for an all-zero row)."""
    valid = _valid(p, mask)
    q = p.masked_fill(~valid, 0)
    peak = q.amax(-1, keepdim=True)
    return ((q >= rel_threshold * peak) & valid & (peak > 0)).sum(-1)


def second_mode_ratio(p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multi-modality: second-largest over largest weight, p_(2) / p_(1) in [0, 1]
    (1: two equal modes; 0: one mode, or fewer than two valid entries)."""
    valid = _valid(p, mask)
    q = p.masked_fill(~valid, 0)
    if q.shape[-1] < 2:
        return torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
    top = q.topk(2, dim=-1).values
    first, second = top[..., 0], top[..., 1]
    return torch.where(first > 0, second / first.clamp_min(torch.finfo(q.dtype).tiny), 0.0)


def entropy(p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shannon entropy in nats, H(p) = −Σ_i p_i log p_i with 0·log 0 = 0."""
    q = p.masked_fill(~_valid(p, mask), 0).float()
    logq = torch.where(q > 0, q.log(), torch.zeros_like(q))
    return -(q * logq).sum(-1)


def attention_statistics(
    p: Tensor,
    mask: Tensor | None = None,
    threshold: float = 1e-3,
    rel_threshold: float = 0.5,
) -> dict[str, float]:
    """Row means of every diagnostic, over rows that hold any probability mass."""
    rows = p.masked_fill(~_valid(p, mask), 0).sum(-1) > 0
    if not bool(rows.any()):
        raise ValueError("attention_statistics: every row is empty (all masked or all zero)")

    def mean(values: Tensor) -> float:
        return float(values.float()[rows].mean())

    return {
        "share_below": mean(share_below(p, threshold, mask)),
        "share_zeros": mean(share_zeros(p, mask)),
        "num_modes": mean(num_modes(p, rel_threshold, mask)),
        "second_mode_ratio": mean(second_mode_ratio(p, mask)),
        "entropy": mean(entropy(p, mask)),
    }


# ε of the ε-perplexity reported by the language pipelines unless the config says otherwise.
EPSILON_PERPLEXITY_DEFAULT = 1e-6


def epsilon_log_likelihood(target_log_probs: Tensor, epsilon: float, vocab_size: int) -> Tensor:
    """Per-token ε-smoothed log-likelihood log((p + ε) / (1 + ε·|V|)) from log p of the
    target tokens (−inf where p = 0), Martins, Marinho & Martins (2020), "Sparse Text
    Generation"; the ε-perplexity is exp(−mean of this). Computed in float64, finite for
    every p in [0, 1] when ε > 0."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 for an ε-perplexity, got {epsilon}")
    log_p = target_log_probs.double()
    log_eps = torch.full_like(log_p, math.log(epsilon))
    return torch.logaddexp(log_p, log_eps) - math.log1p(epsilon * vocab_size)


def epsilon_perplexity(target_log_probs: Tensor, epsilon: float, vocab_size: int) -> float:
    """exp(−(1/T) Σ_t log((p(x_t) + ε) / (1 + ε·|V|))) over the T given tokens."""
    if target_log_probs.numel() == 0:
        raise ValueError("epsilon_perplexity of no tokens")
    mean = epsilon_log_likelihood(target_log_probs, epsilon, vocab_size).mean()
    return float(torch.exp(-mean))


__all__ = [
    "EPSILON_PERPLEXITY_DEFAULT",
    "attention_statistics",
    "epsilon_log_likelihood",
    "epsilon_perplexity",
    "entropy",
    "num_modes",
    "second_mode_ratio",
    "share_below",
    "share_zeros",
]

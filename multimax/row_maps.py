"""How the tiled fused attention turns a row of transformed scores into weights, with the
backward beside each forward: softmax, softmax with a sink logit, sigmoid and softpick.

Every map sees H = σ(x) + bias (float32 for half-precision inputs) with masked entries at
−∞, the whole row in one tile, and keeps two numbers per row (its *statistics*) from which
the backward recomputes the weights P bit for bit. With δ = Σ_j P_j·dP_j (one per row):

    softmax        P = exp(H − m − log s),           s = Σ exp(H − m)
                   dH = P ⊙ (dP − δ)
    softmax_sink   P = exp(H − m − log s),           s = e^{sink − m} + Σ exp(H − m)
                   dH = P ⊙ (dP − δ),   d sink = −Σ_rows e^{sink − m − log s} · δ
    sigmoid        P = sigmoid(H + b),                b = −log n, or fixed (no statistics)
                   dH = dP ⊙ P ⊙ (1 − P)
    softpick       c = e^{H − m} − e^{−m} (0 where masked),   D = Σ |c| + ε·e^{−m},  P = relu(c)/D
                   dH = (e^{H − m} / D) ⊙ (1[c > 0] ⊙ dP − sign(c) · δ)

m is a per-row shift (the row max, with the sink for softmax_sink, at least 0 for softpick)
and n the row's number of unmasked keys (causal masks included). A row with no key gives
zeros. Per-head parameters (the sink) come shaped to broadcast against (..., H, N, M) scores;
their gradient is summed over everything but the head.

A :class:`FusedSpec` pairs a point-wise σ (:mod:`multimax.sigma`) with a map;
:func:`fused_spec` says which normaliser uses which (None: the fused path cannot run it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .normalizers import Sigmoid, SoftmaxSink, Softpick
from .sigma import IDENTITY_SIGMA, PointwiseSigma, pointwise_sigma

_NEG_INF = float("-inf")


def _row_shift(h: Tensor, floor: Tensor | float | None = None) -> Tensor:
    """The row max of h (keepdim), raised to ``floor`` where given; 0 for a row of −∞ only."""
    m = h.amax(-1, keepdim=True)
    if floor is not None:
        m = torch.maximum(m, torch.as_tensor(floor, dtype=m.dtype, device=m.device))
    return torch.where(m == _NEG_INF, torch.zeros_like(m), m).detach()


def _sum_to_param(rows: Tensor, param: Tensor) -> Tensor:
    """A per-row gradient (..., N, 1) summed to ``param``'s broadcast shape, flattened."""
    lead = rows.dim() - param.dim()
    total = rows.sum(dim=tuple(range(lead))) if lead > 0 else rows
    dims = tuple(i for i, size in enumerate(param.shape) if size == 1 and total.shape[i] != 1)
    return (total.sum(dim=dims, keepdim=True) if dims else total).reshape(-1)


def _no_params(h: Tensor) -> Tensor:
    return h.new_zeros(0)


# --- softmax ---------------------------------------------------------------------------------


def _softmax_forward(h: Tensor) -> tuple[Tensor, Tensor]:
    # The pair (m, log s), not m + log s: rounding that sum would scale the whole row of P by
    # a relative error of about ulp(m), ten times the softmax's own.
    m = _row_shift(h)
    s = torch.exp(h - m).sum(-1, keepdim=True)
    log_s = torch.log(torch.where(s > 0, s, torch.ones_like(s)))
    stats = torch.cat([m, log_s], dim=-1)
    return _softmax_probs(h, stats), stats


def _softmax_probs(h: Tensor, stats: Tensor) -> Tensor:
    return torch.exp((h - stats[..., :1]) - stats[..., 1:])


def _softmax_backward(h, p, dp, stats):
    # δ = rowsum(P ⊙ dP), as softmax's own backward has it (rowsum(dO ⊙ O) is equal in exact
    # arithmetic but cancels badly when σ steepens the scores).
    dh = p * (dp - (p * dp).sum(-1, keepdim=True))
    return dh, _no_params(h)


# --- softmax with a sink logit ---------------------------------------------------------------


def _sink_forward(h: Tensor, sink: Tensor) -> tuple[Tensor, Tensor]:
    sink = sink.to(h.dtype)
    m = _row_shift(torch.maximum(h, torch.broadcast_to(sink, h.shape[:-1] + (1,))))
    s = torch.exp(h - m).sum(-1, keepdim=True) + torch.exp(sink - m)
    stats = torch.cat([m, torch.log(s)], dim=-1)
    return _softmax_probs(h, stats), stats


def _sink_probs(h: Tensor, stats: Tensor, sink: Tensor) -> Tensor:
    return _softmax_probs(h, stats)


def _sink_backward(h, p, dp, stats, sink):
    delta = (p * dp).sum(-1, keepdim=True)
    sink_weight = torch.exp((sink.to(h.dtype) - stats[..., :1]) - stats[..., 1:])
    return p * (dp - delta), _sum_to_param(-sink_weight * delta, sink)


# --- sigmoid ---------------------------------------------------------------------------------


def _sigmoid_shift(h: Tensor, logit_bias: float | None) -> Tensor:
    if logit_bias is not None:
        return torch.full(h.shape[:-1] + (1,), logit_bias, dtype=h.dtype, device=h.device)
    kept = (h > _NEG_INF).sum(-1, keepdim=True).clamp_min(1)
    return -torch.log(kept.to(h.dtype))


@functools.cache
def _sigmoid_functions(logit_bias: float | None):
    def forward(h: Tensor) -> tuple[Tensor, Tensor]:
        shift = _sigmoid_shift(h, logit_bias)
        stats = torch.cat([shift, torch.zeros_like(shift)], dim=-1)
        return probs(h, stats), stats

    def probs(h: Tensor, stats: Tensor) -> Tensor:
        return torch.sigmoid(h + stats[..., :1])

    def backward(h, p, dp, stats):
        return dp * p * (1 - p), _no_params(h)

    return forward, probs, backward


# --- softpick --------------------------------------------------------------------------------


def _softpick_parts(h: Tensor, stats: Tensor) -> tuple[Tensor, Tensor]:
    """(e^{H − m}, c) of a row whose shift m is ``stats[..., :1]`` (both 0 where masked)."""
    m = stats[..., :1]
    e = torch.exp(h - m)
    c = torch.where(h > _NEG_INF, e - torch.exp(-m), torch.zeros_like(e))
    return e, c


@functools.cache
def _softpick_functions(epsilon: float):
    def forward(h: Tensor) -> tuple[Tensor, Tensor]:
        m = _row_shift(h, 0.0)
        _, c = _softpick_parts(h, torch.cat([m, m], dim=-1))
        total = c.abs().sum(-1, keepdim=True) + epsilon * torch.exp(-m)
        stats = torch.cat([m, total], dim=-1)
        return torch.relu(c) / total, stats

    def probs(h: Tensor, stats: Tensor) -> Tensor:
        return torch.relu(_softpick_parts(h, stats)[1]) / stats[..., 1:]

    def backward(h, p, dp, stats):
        e, c = _softpick_parts(h, stats)
        delta = (p * dp).sum(-1, keepdim=True)
        dh = (e / stats[..., 1:]) * ((c > 0).to(dp.dtype) * dp - torch.sign(c) * delta)
        return dh, _no_params(h)

    return forward, probs, backward


# --- specs and the lookup --------------------------------------------------------------------


@dataclass(frozen=True)
class RowMap:
    """``forward(h, *params) -> (P, stats (..., N, 2))``; ``probs(h, stats, *params) -> P``
    (the same P, recomputed); ``backward(h, P, dP, stats, *params) -> (dH, dparams)``, dparams
    a 1-D tensor of the parameters' gradients, flattened in order; ``params(normalizer)`` the
    parameter tensors, shaped to broadcast against the scores (``scores_like``: q or the
    scores, heads on axis −3)."""

    key: str
    forward: Callable[..., tuple[Tensor, Tensor]]
    probs: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor]]
    params: Callable[[nn.Module, Tensor], tuple[Tensor, ...]] = lambda n, scores_like: ()


SOFTMAX_ROWS = RowMap("softmax", _softmax_forward, _softmax_probs, _softmax_backward)
SINK_ROWS = RowMap(
    "softmax_sink",
    _sink_forward,
    _sink_probs,
    _sink_backward,
    lambda n, scores_like: (n.head_view(n.sink, scores_like),),
)


@functools.cache
def sigmoid_rows(logit_bias: float | None) -> RowMap:
    """Sigmoid attention's map with bias b = ``logit_bias`` (None: −log n), b in the kernel."""
    return RowMap(f"sigmoid{logit_bias}", *_sigmoid_functions(logit_bias))


@functools.cache
def softpick_rows(epsilon: float) -> RowMap:
    """Softpick's map with its ε fixed in the kernel."""
    return RowMap(f"softpick{epsilon}", *_softpick_functions(epsilon))


@dataclass(frozen=True)
class FusedSpec:
    """What the fused attention kernels run for one normaliser: σ, then a row map. ``key``
    names the kernel for caching compiled versions."""

    sigma: PointwiseSigma
    rows: RowMap

    @property
    def key(self) -> str:
        return f"{self.sigma.key}-{self.rows.key}"


_MAPS: dict[type, Callable[[nn.Module], RowMap]] = {
    SoftmaxSink: lambda n: SINK_ROWS,
    Sigmoid: lambda n: sigmoid_rows(n.logit_bias),
    Softpick: lambda n: softpick_rows(n.epsilon),
}


@functools.cache
def _spec(sigma: PointwiseSigma, rows: RowMap) -> FusedSpec:
    return FusedSpec(sigma, rows)  # one object per pair: compiled kernels are cached on it


def fused_spec(normalizer: nn.Module) -> FusedSpec | None:
    """The fused kernels' spec for ``normalizer``: softmax of a registered point-wise σ, or a
    normaliser with a row map here (no σ); None when the fused path cannot run it."""
    sigma = pointwise_sigma(normalizer)
    if sigma is not None:
        return _spec(sigma, SOFTMAX_ROWS)
    make = _MAPS.get(type(normalizer))
    return None if make is None else _spec(IDENTITY_SIGMA, make(normalizer))


__all__ = [
    "SINK_ROWS",
    "SOFTMAX_ROWS",
    "FusedSpec",
    "RowMap",
    "fused_spec",
    "sigmoid_rows",
    "softpick_rows",
]

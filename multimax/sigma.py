"""The point-wise score maps σ, each written once with its derivative beside it.

Every normaliser that is softmax of a point-wise σ uses the function here: the reference
module (``MultiMax.modulate``, ``Softmax.transform``) differentiates it with autograd, and the
fused kernels (attention, chunked loss, output layer, FlexAttention's ``score_mod``) call the
same forward and the hand-written backward next to it.

    MultiMax, order K:  σ(x) = x + Σ_{k=1..K} a_k·relu(b_k − x)^k + c_k·relu(x − d_k)^k
        ∂σ/∂x   = 1 + Σ_k −a_k·k·relu(b_k − x)^(k−1) + c_k·k·relu(x − d_k)^(k−1)
        ∂σ/∂b_k = a_k·k·relu(b_k − x)^(k−1),   ∂σ/∂d_k = −c_k·k·relu(x − d_k)^(k−1)
        ∂σ/∂a_k = relu(b_k − x)^k,              ∂σ/∂c_k = relu(x − d_k)^k
        (for k = 1 the step relu' is strict, relu'(0) = 0, as autograd has it)
    MultiMax V2:        σ(x) = σ₁(t·x + s)            (scalars t, s of shape (1,))
    temperature:        σ(x) = x / exp(log T)
    identity:           σ(x) = x

A :class:`PointwiseSigma` bundles one σ's forward, backward and parameter getter for the
kernels; :func:`register_pointwise_sigma` says which normaliser class uses which (the classes
register themselves where they are defined), :func:`pointwise_sigma` looks it up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# --- MultiMax ------------------------------------------------------------------------------


def _modulate(x: Tensor, order: int, low_t: Tensor, high_t: Tensor, low_c: Tensor, high_c: Tensor):
    out = x
    for k in range(order):
        low = torch.relu(low_t[k] - x)
        high = torch.relu(x - high_t[k])
        if k > 0:
            low, high = low.pow(k + 1), high.pow(k + 1)
        out = out + low_c[k] * low + high_c[k] * high
    return out


def _modulate_backward(
    x: Tensor, dh: Tensor, order: int, low_t: Tensor, high_t: Tensor, low_c: Tensor, high_c: Tensor
) -> tuple[Tensor, Tensor]:
    slope = torch.ones_like(x)
    g_lt, g_ht, g_lc, g_hc = [], [], [], []
    for k in range(order):
        low = torch.relu(low_t[k] - x)
        high = torch.relu(x - high_t[k])
        if k == 0:
            # relu'(0) = 0, as autograd has it: the step is strict.
            d_low = (x < low_t[k]).to(x.dtype)
            d_high = (x > high_t[k]).to(x.dtype)
            p_low, p_high = low, high
        else:
            d_low = (k + 1) * low.pow(k)
            d_high = (k + 1) * high.pow(k)
            p_low, p_high = low.pow(k + 1), high.pow(k + 1)
        slope = slope - low_c[k] * d_low + high_c[k] * d_high
        g_lt.append(low_c[k] * (dh * d_low).sum())
        g_ht.append(-high_c[k] * (dh * d_high).sum())
        g_lc.append((dh * p_low).sum())
        g_hc.append((dh * p_high).sum())
    return dh * slope, torch.stack(g_lt + g_ht + g_lc + g_hc)


def modulate(
    x: Tensor, low_threshold: Tensor, high_threshold: Tensor, low_coef: Tensor, high_coef: Tensor
) -> Tensor:
    """MultiMax's σ(x), entry-wise; the four parameter vectors (b, d, a, c) have shape (K,)."""
    order = low_threshold.shape[0]
    return _modulate(x, order, low_threshold, high_threshold, low_coef, high_coef)


def modulate_backward(
    x: Tensor,
    dh: Tensor,
    low_threshold: Tensor,
    high_threshold: Tensor,
    low_coef: Tensor,
    high_coef: Tensor,
) -> tuple[Tensor, Tensor]:
    """(dh ⊙ σ'(x), [Σ dh ⊙ ∂σ/∂b, ∂σ/∂d, ∂σ/∂a, ∂σ/∂c] flattened to (4K,)) of :func:`modulate`."""
    order = low_threshold.shape[0]
    return _modulate_backward(x, dh, order, low_threshold, high_threshold, low_coef, high_coef)


def modulate_v2(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    low_threshold: Tensor,
    high_threshold: Tensor,
    low_coef: Tensor,
    high_coef: Tensor,
) -> Tensor:
    """MultiMax V2's σ₁(t·x + s), entry-wise; ``scale`` = t and ``shift`` = s have shape (1,)."""
    h = scale[0] * x + shift[0]
    return _modulate(h, 1, low_threshold, high_threshold, low_coef, high_coef)


def modulate_v2_backward(
    x: Tensor, dh: Tensor, scale: Tensor, shift: Tensor, *sigma_params: Tensor
) -> tuple[Tensor, Tensor]:
    """(dh ⊙ σ'(x), [dt, ds, then σ₁'s four]) of :func:`modulate_v2`."""
    d_inner, d_params = _modulate_backward(scale[0] * x + shift[0], dh, 1, *sigma_params)
    d_scale = (d_inner * x).sum().reshape(1)
    d_shift = d_inner.sum().reshape(1)
    return d_inner * scale[0], torch.cat([d_scale, d_shift, d_params])


# --- softmax with a temperature -------------------------------------------------------------


def divide_by_temperature(x: Tensor, log_temperature: Tensor) -> Tensor:
    """x / T with T = exp(log T) (a 0-d tensor: the result keeps x's dtype)."""
    return x / log_temperature.exp()


def divide_by_temperature_backward(
    x: Tensor, dh: Tensor, log_temperature: Tensor
) -> tuple[Tensor, Tensor]:
    """(dh / T, [−Σ dh ⊙ x / T]) of :func:`divide_by_temperature`."""
    dx = dh * (-log_temperature).exp()
    return dx, (-(dx * x).sum()).reshape(1)


def _identity(x: Tensor) -> Tensor:
    return x


def _identity_backward(x: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
    return dh, dh.new_zeros(0)


# --- kernel specs and the registry ----------------------------------------------------------


@dataclass(frozen=True)
class PointwiseSigma:
    """σ as pure tensor functions of the scores x and its parameter tensors.

    ``forward(x, *params) -> σ(x)``; ``backward(x, dh, *params) -> (dx, dparams)`` with
    ``dx = dh ⊙ σ'(x)`` and ``dparams`` a 1-D tensor of the parameter gradients, flattened in
    the order of ``params`` (summed over every entry of ``dh``); ``params(normalizer)`` gives
    the parameter tensors. ``key`` names the kernel for caching compiled versions.
    """

    key: str
    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor]]
    params: Callable[[nn.Module], tuple[Tensor, ...]]


@functools.cache
def multimax_sigma(order: int) -> PointwiseSigma:
    """MultiMax's σ of order K, the order fixed in the kernel (a loop compiled unrolled)."""

    def forward(x: Tensor, *params: Tensor) -> Tensor:
        return _modulate(x, order, *params)

    def backward(x: Tensor, dh: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        return _modulate_backward(x, dh, order, *params)

    return PointwiseSigma(f"multimax{order}", forward, backward, lambda n: n.sigma_parameters())


MULTIMAX_V2_SIGMA = PointwiseSigma(
    "multimax_v2",
    modulate_v2,
    modulate_v2_backward,
    lambda n: (*n.affine_parameters(), *n.sigma_parameters()),
)
TEMPERATURE_SIGMA = PointwiseSigma(
    "temperature",
    divide_by_temperature,
    divide_by_temperature_backward,
    lambda n: (n.log_temperature,),
)
IDENTITY_SIGMA = PointwiseSigma("identity", _identity, _identity_backward, lambda n: ())

_SIGMA_FACTORIES: dict[type, Callable[[nn.Module], PointwiseSigma]] = {}


def register_pointwise_sigma(cls: type, factory: Callable[[nn.Module], PointwiseSigma]) -> None:
    """Let normalisers of class ``cls`` (exactly; mapping softmax) use the fused paths."""
    _SIGMA_FACTORIES[cls] = factory


def pointwise_sigma(normalizer: nn.Module) -> PointwiseSigma | None:
    """The σ spec of ``normalizer``, or None when it is not softmax of a registered σ."""
    if getattr(normalizer, "mapping", None) != "softmax":
        return None
    factory = _SIGMA_FACTORIES.get(type(normalizer))
    return None if factory is None else factory(normalizer)


__all__ = [
    "IDENTITY_SIGMA",
    "MULTIMAX_V2_SIGMA",
    "TEMPERATURE_SIGMA",
    "PointwiseSigma",
    "divide_by_temperature",
    "divide_by_temperature_backward",
    "modulate",
    "modulate_backward",
    "modulate_v2",
    "modulate_v2_backward",
    "multimax_sigma",
    "pointwise_sigma",
    "register_pointwise_sigma",
]

"""MultiMax (Zhou, Fritz, Keuper; ICML 2024): SoftMax of a piece-wise polynomial modulation.

    σ(x) = x + Σ_{k=1..K} [ a_k · relu(b_k − x)^k  +  c_k · relu(x − d_k)^k ]
    MultiMax(x) = softmax(σ(x))

b_k / d_k are the low / high thresholds and a_k / c_k the low / high coefficients. For
K = 1 the slope of σ is t_b = 1 − a_1 below b and t_d = 1 + c_1 above d (identity between):
t_b > 1 pushes small scores down (sparsity), t_d < 1 pulls large scores together (several
modes keep mass). Any order K >= 1 is allowed; the paper uses K = 1 and K = 2.

MultiMax V2 (the authors' repository, 2026) puts a learned affine map before a first-order σ:

    h = t·x + b  (scalars t, b; init t = 1, b = 0),   MultiMaxV2(x) = softmax(σ₁(h))

σ itself (:func:`modulate`, :func:`modulate_v2`) and its derivative are written once, in
:mod:`multimax.sigma`; the modules here own the parameters and differentiate σ with autograd.

Initialisation of σ's 4·K scalars (:func:`init_sigma_`, one of :data:`SIGMA_INITS`):
``trunc_normal`` N(0, std²) cut at ±2·std (this suite's default); ``trunc_normal_timm`` timm's
``trunc_normal_(std=std)`` call, cut at ±2 absolute, which at std 0.02 is an uncut normal (the
authors' code); ``zeros``: σ is the identity and MultiMax is SoftMax exactly at step 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .normalizers import NORMALIZERS, Normalizer, softmax_masked
from .precision import upcast
from .sigma import (
    MULTIMAX_V2_SIGMA,
    modulate,
    modulate_v2,
    multimax_sigma,
    register_pointwise_sigma,
)

INIT_STD = 0.02
SIGMA_INITS = ("trunc_normal", "trunc_normal_timm", "zeros")


def init_sigma_(normalizer: nn.Module, kind: str = "trunc_normal", std: float = INIT_STD) -> None:
    """Draw the σ scalars (thresholds and coefficients) of ``normalizer`` afresh, in place, by
    ``kind`` (:data:`SIGMA_INITS`, see the module docstring); a normaliser without σ is left
    as it is. MultiMax V2's affine scalars keep their identity initialisation."""
    if kind not in SIGMA_INITS:
        raise ValueError(f"σ initialisation {kind!r} is unknown; valid: {', '.join(SIGMA_INITS)}")
    if not isinstance(normalizer, MultiMax):
        return
    with torch.no_grad():
        for p in normalizer.sigma_parameters():
            if kind == "zeros":
                p.zero_()
            elif kind == "trunc_normal_timm":
                nn.init.trunc_normal_(p, std=std)  # timm's default cut: a=-2, b=2 (absolute)
            else:
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)


def multimax(
    x: Tensor,
    low_threshold: Tensor,
    high_threshold: Tensor,
    low_coef: Tensor,
    high_coef: Tensor,
    mask: Tensor | None = None,
    dim: int = -1,
) -> Tensor:
    """MultiMax(x) = softmax(σ(x)) along ``dim``, with the parameters held by the caller."""
    h = modulate(upcast(x), low_threshold, high_threshold, low_coef, high_coef)
    return softmax_masked(h, mask, dim).to(x.dtype)


@NORMALIZERS.register("multimax")
class MultiMax(Normalizer):
    """MultiMax normaliser with 4·K learnable scalars (K = ``order``, any integer >= 1).

    All scalars start from a truncated normal with std 0.02 (the authors' initialisation),
    so a fresh MultiMax is SoftMax up to ~1e-2 relative change of the scores; ``init`` /
    ``init_std`` choose another draw (:func:`init_sigma_`).
    """

    def __init__(
        self, order: int = 2, init_std: float = INIT_STD, init: str = "trunc_normal"
    ) -> None:
        super().__init__()
        if isinstance(order, bool) or int(order) != order or order < 1:
            raise ValueError(
                f"MultiMax order must be an integer >= 1 (the paper uses 1 and 2), got {order!r}"
            )
        order = int(order)
        self.order = order
        self.low_threshold = nn.Parameter(torch.empty(order))
        self.high_threshold = nn.Parameter(torch.empty(order))
        self.low_coef = nn.Parameter(torch.empty(order))
        self.high_coef = nn.Parameter(torch.empty(order))
        if init not in SIGMA_INITS:
            raise ValueError(
                f"σ initialisation {init!r} is unknown; valid: {', '.join(SIGMA_INITS)}"
            )
        self.init, self.init_std = init, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_sigma_(self, self.init, self.init_std)

    def sigma_parameters(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(low_threshold, high_threshold, low_coef, high_coef): the argument order of
        :func:`modulate`."""
        return (self.low_threshold, self.high_threshold, self.low_coef, self.high_coef)

    def modulate(self, x: Tensor) -> Tensor:
        """σ(x), same shape and dtype as ``x``."""
        return modulate(x, *(p.to(x.dtype) for p in self.sigma_parameters()))

    transform = modulate

    def extra_repr(self) -> str:
        return f"order={self.order}"


@NORMALIZERS.register("multimax_v2")
class MultiMaxV2(MultiMax):
    """MultiMax V2: softmax(σ₁(t·x + b)) with learned scalars t (``affine_scale``, init 1)
    and b (``affine_shift``, init 0) before a first-order σ₁ (MultiMax's four scalars and
    their initialisation). Six learnable scalars per instance.
    """

    def __init__(self, init_std: float = INIT_STD, init: str = "trunc_normal") -> None:
        super().__init__(order=1, init_std=init_std, init=init)
        self.affine_scale = nn.Parameter(torch.ones(1))  # t, shape (1,) as MultiMax's b_k ...
        self.affine_shift = nn.Parameter(torch.zeros(1))  # b

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "affine_scale"):  # not yet while MultiMax.__init__ runs
            with torch.no_grad():
                self.affine_scale.fill_(1.0)
                self.affine_shift.zero_()

    def affine_parameters(self) -> tuple[Tensor, Tensor]:
        """(t, b) of h = t·x + b: the leading arguments of :func:`modulate_v2`."""
        return (self.affine_scale, self.affine_shift)

    def modulate(self, x: Tensor) -> Tensor:
        """σ₁(t·x + b), same shape and dtype as ``x``."""
        params = (*self.affine_parameters(), *self.sigma_parameters())
        return modulate_v2(x, *(p.to(x.dtype) for p in params))

    transform = modulate

    def extra_repr(self) -> str:
        return "affine t·x + b, then first-order σ"


register_pointwise_sigma(MultiMax, lambda n: multimax_sigma(n.order))
register_pointwise_sigma(MultiMaxV2, lambda n: MULTIMAX_V2_SIGMA)

__all__ = [
    "INIT_STD",
    "SIGMA_INITS",
    "MultiMax",
    "MultiMaxV2",
    "init_sigma_",
    "modulate",
    "modulate_v2",
    "multimax",
]

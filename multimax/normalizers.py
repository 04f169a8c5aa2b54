"""The normaliser zoo behind one contract: ``forward(x, mask=None, dim=-1, bias=None)``.

Every normaliser is two steps, applied along ``dim``:

1. ``transform(x)``: a point-wise map of the scores (identity, ``x / T``, MultiMax's σ);
2. a *mapping* of the transformed scores onto the probability simplex
   (softmax, sparsemax, 1.5-entmax, evidential softmax), or, for the attention normalisers of
   2024-2025, onto weights that need not sum to one (sigmoid attention, softpick, a sink
   logit, stick-breaking); Scalable-Softmax and learned-α entmax are distributions again.

Some learn one value per attention head (``num_heads``: :class:`PerHeadNormalizer`); one is
causal only (``causal_only``: stick-breaking); the ones whose rows are not distributions say
why in ``output_refusal`` and cannot be an output layer (:func:`check_output_normalizer`).

``bias`` (an additive attention mask or position bias) is added between the two steps, so σ
sees the raw scores. ``mask`` is boolean, ``True`` = keep; masked entries get
exactly zero and a row with every entry masked returns zeros, never NaN. Half-precision
inputs are computed in float32 and returned in their own dtype.

The functional forms (``softmax_masked``, ``sparsemax_masked``, ...) hold the math; the
``nn.Module`` classes own parameters and the train/eval switch; ``NORMALIZERS`` and
``build_normalizer`` are the registry that configs select from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import entmax
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import upcast
from .sigma import (
    IDENTITY_SIGMA,
    TEMPERATURE_SIGMA,
    divide_by_temperature,
    register_pointwise_sigma,
)

# A masked entry is moved this far below the row's largest kept score before the mapping.
# Any margin > 2 gives an exact zero under sparsemax (threshold >= max - 1) and 1.5-entmax
# (threshold >= max/2 - 1); exp(-1e4) underflows to exactly 0 in float32 for softmax.
_MASK_MARGIN = 1.0e4

# An additive mask entry at or below this value is a masked entry, not a score offset:
# fairseq fills masks with -1e8 (-1e4 in half precision), Hugging Face with finfo.min, and
# exp(-1e4) is exactly 0 in every float type, so softmax gives such entries no weight anyway;
# counting them as masked keeps them out of evsoftmax's row mean too.
MASKED_BIAS = -1.0e4

EVSOFTMAX_EPSILON = 1.0e-6


def _fill_masked(x: Tensor, keep: Tensor, dim: int) -> Tensor:
    """Replace masked entries by (largest kept entry - margin), finite even for empty rows."""
    row_max = x.masked_fill(~keep, float("-inf")).amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    return torch.where(keep, x, row_max - _MASK_MARGIN)


def _apply_mapping(
    mapping: Callable[[Tensor, int], Tensor], x: Tensor, mask: Tensor | None, dim: int
) -> Tensor:
    if x.shape[dim] == 0:  # no entry to normalise (zero keys): empty, still in the graph
        return x * 0
    if mask is None:
        return mapping(x, dim)
    keep = mask.to(torch.bool).expand_as(x)
    p = mapping(_fill_masked(x, keep, dim), dim)
    return torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))


# --- functional forms -------------------------------------------------------------------


def softmax_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """softmax(x)_i = exp(x_i) / Σ_j exp(x_j) over the kept entries; zeros elsewhere."""
    return _apply_mapping(lambda h, d: torch.softmax(h, dim=d), x, mask, dim)


def sparsemax_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """sparsemax(x) = argmin_{p in simplex} ||p - x||² (Martins & Astudillo, 2016)."""
    return _apply_mapping(lambda h, d: entmax.sparsemax(h, dim=d), x, mask, dim)


def entmax15_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """1.5-entmax(x)_i = [x_i/2 - τ]_+² with τ such that Σ p = 1 (Peters et al., 2019)."""
    return _apply_mapping(lambda h, d: entmax.entmax15(h, dim=d), x, mask, dim)


def evsoftmax_log_weights(
    x: Tensor, mask: Tensor | None = None, dim: int = -1, epsilon: float = 0.0
) -> Tensor:
    """log w_i for evidential softmax: 0 where x_i >= mean of the kept x, log ε below it.

    With ε = 0 the entries below the mean are sent to the mask margin (exactly zero weight).
    """
    if mask is None:
        mean = x.mean(dim=dim, keepdim=True)
    else:
        keep = mask.to(torch.bool).expand_as(x)
        count = keep.sum(dim=dim, keepdim=True).clamp_min(1)
        mean = torch.where(keep, x, torch.zeros_like(x)).sum(dim=dim, keepdim=True) / count
    low = math.log(epsilon) if epsilon > 0 else -_MASK_MARGIN
    above = x.detach() >= mean.detach()
    return torch.where(above, torch.zeros_like(x), torch.full_like(x, low))


def evsoftmax_masked(
    x: Tensor, mask: Tensor | None = None, dim: int = -1, epsilon: float = 0.0
) -> Tensor:
    """Evidential softmax (Chen et al., 2021): p_i ∝ w_i exp(x_i), w_i = 1 if x_i >= mean(x)
    else ε (ε > 0 in training, ε = 0 at evaluation), renormalised over the kept entries."""
    return softmax_masked(x + evsoftmax_log_weights(x, mask, dim, epsilon), mask, dim)


# --- modules ----------------------------------------------------------------------------


class Normalizer(nn.Module):
    """Base class: ``forward(x, mask=None, dim=-1, bias=None)`` -> probabilities along dim.

    Subclasses set ``mapping`` (``"softmax"``, ``"sparsemax"``, ``"entmax15"``,
    ``"evsoftmax"``) and may override ``transform`` (a point-wise map of the scores).
    """

    mapping: str = "softmax"
    # Takes ``num_heads`` (one learned value per attention head): integrations pass theirs.
    per_head: bool = False
    # Only meaningful in causal attention: :func:`multimax.attention` refuses other uses.
    causal_only: bool = False
    # Why it cannot be an output layer (its rows are not a distribution), or None if it can.
    output_refusal: str | None = None

    def transform(self, x: Tensor) -> Tensor:
        """Point-wise score map applied before masking; identity by default."""
        return x

    @property
    def is_plain_softmax(self) -> bool:
        """True when this normaliser is exactly softmax(x) (fast paths may use SDPA)."""
        return False

    def map_to_simplex(self, h: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
        """The mapping step alone, on already transformed scores."""
        if self.mapping == "softmax":
            return softmax_masked(h, mask, dim)
        if self.mapping == "sparsemax":
            return sparsemax_masked(h, mask, dim)
        if self.mapping == "entmax15":
            return entmax15_masked(h, mask, dim)
        if self.mapping == "evsoftmax":
            epsilon = EVSOFTMAX_EPSILON if self.training else 0.0
            return evsoftmax_masked(h, mask, dim, epsilon)
        raise ValueError(f"unknown mapping {self.mapping!r}")

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dim: int = -1, bias: Tensor | None = None
    ) -> Tensor:
        h = self.transform(upcast(x))
        if bias is not None:
            h = h + upcast(bias)
        return self.map_to_simplex(h, mask, dim).to(x.dtype)


class Softmax(Normalizer):
    """softmax(x / T): T fixed (``temperature``) or learned (``learn_temperature=True``).

    A learned temperature is stored as log T so it stays positive.
    """

    def __init__(self, temperature: float = 1.0, learn_temperature: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        self.learn_temperature = learn_temperature
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)
        self._fixed_temperature = float(temperature)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    @property
    def is_plain_softmax(self) -> bool:
        return not self.learn_temperature and self._fixed_temperature == 1.0

    def transform(self, x: Tensor) -> Tensor:
        if self.is_plain_softmax:
            return x
        return divide_by_temperature(x, self.log_temperature)

    def extra_repr(self) -> str:
        return f"temperature={self._fixed_temperature}, learn_temperature={self.learn_temperature}"


register_pointwise_sigma(
    Softmax, lambda n: IDENTITY_SIGMA if n.is_plain_softmax else TEMPERATURE_SIGMA
)


class Sparsemax(Normalizer):
    """sparsemax(x): Euclidean projection onto the simplex (exact zeros)."""

    mapping = "sparsemax"


class Entmax15(Normalizer):
    """1.5-entmax(x): between softmax and sparsemax (exact zeros, smoother)."""

    mapping = "entmax15"


class EvSoftmax(Normalizer):
    """Evidential softmax: entries below the row mean get weight ε in training, 0 in eval."""

    mapping = "evsoftmax"


# --- normalisers of 2024-2025 --------------------------------------------------------------
# Their functional forms take the parameter tensors (scale, sink, α) already shaped to broadcast
# against x with ``dim`` moved last: a scalar, or (H, 1, 1) for x of shape (..., H, N, M).

SOFTPICK_EPSILON = 1.0e-6
SSMAX_SCALE_INIT = 0.43  # the s of the SSMax paper's Figure 1
ENTMAX_ALPHA_INIT = 1.5
# α is kept in [1 + this, 2]: α → 1 is softmax, where the bisection's 1 / (α − 1) blows up.
ENTMAX_ALPHA_MIN_MARGIN = 1.0e-3
ENTMAX_BISECT_ITERATIONS = 50


def _rows_last(x: Tensor, mask: Tensor | None, dim: int) -> tuple[Tensor, Tensor | None]:
    """x and its keep mask (expanded, bool) with ``dim`` moved to the last axis."""
    keep = None if mask is None else mask.to(torch.bool).expand_as(x).movedim(dim, -1)
    return x.movedim(dim, -1), keep


def _zero_masked(p: Tensor, keep: Tensor | None) -> Tensor:
    if keep is None:
        return p
    return torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))


def kept_count(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """n of every row: the number of unmasked entries along ``dim`` (keepdim, x's dtype)."""
    if mask is None:
        shape = list(x.shape)
        shape[dim] = 1
        return torch.full(shape, x.shape[dim], dtype=x.dtype, device=x.device)
    return mask.to(torch.bool).expand_as(x).sum(dim=dim, keepdim=True).to(x.dtype)


def sigmoid_attention_weights(
    x: Tensor, mask: Tensor | None = None, dim: int = -1, logit_bias: float | Tensor | None = None
) -> Tensor:
    """Sigmoid attention (Ramapuram et al., ICLR 2025): w_j = sigmoid(x_j + b), no row
    normalisation; b = ``logit_bias``, or −log n (n = the row's unmasked entries) when None."""
    if logit_bias is None:
        logit_bias = -kept_count(x, mask, dim).clamp_min(1).log()
    p = torch.sigmoid(x + logit_bias)
    return _zero_masked(p.movedim(dim, -1), _rows_last(x, mask, dim)[1]).movedim(-1, dim)


def softpick_masked(
    x: Tensor, mask: Tensor | None = None, dim: int = -1, epsilon: float = SOFTPICK_EPSILON
) -> Tensor:
    """Softpick (Zuhri et al., 2025): w_j = relu(e^{x_j} − 1) / (Σ_k |e^{x_k} − 1| + ε).

    Computed as relu(e^{x_j − m} − e^{−m}) / (Σ_k |e^{x_k − m} − e^{−m}| + ε·e^{−m}), the
    same value, with m = max(0, the row's largest kept entry): no exponential overflows, not
    even for a row far below zero (where the paper's shift by the row max would)."""
    if x.shape[dim] == 0:  # no entry: empty, still in the graph
        return x * 0
    x, keep = _rows_last(x, mask, dim)
    kept = x if keep is None else x.masked_fill(~keep, float("-inf"))
    shift = kept.amax(dim=-1, keepdim=True).clamp_min(0).detach()
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    offset = torch.exp(-shift)
    centred = torch.exp(x - shift) - offset
    if keep is not None:
        centred = torch.where(keep, centred, torch.zeros_like(centred))
    total = centred.abs().sum(dim=-1, keepdim=True) + epsilon * offset
    return (torch.relu(centred) / total).movedim(-1, dim)


def ssmax_masked(x: Tensor, scale: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Scalable-Softmax (Nakanishi, 2025): softmax(s · log n · x), n the row's unmasked
    entries (a row of one key gives it weight 1)."""
    log_n = kept_count(x, mask, dim).clamp_min(1).log()
    x_last = x.movedim(dim, -1)
    scaled = (scale * log_n.movedim(dim, -1) * x_last).movedim(-1, dim)
    return softmax_masked(scaled, mask, dim)


def softmax_sink_masked(
    x: Tensor, sink: Tensor, mask: Tensor | None = None, dim: int = -1
) -> Tensor:
    """Softmax with a sink logit s: w_j = e^{x_j} / (e^{s} + Σ_k e^{x_k}) over the kept entries
    (softmax₁ for s = 0); the mass e^{s} / (...) goes to no entry. An empty row gives zeros."""
    if x.shape[dim] == 0:  # no entry: empty, still in the graph (x's and the sink's)
        return x * 0 + 0 * sink.to(x.dtype).sum()
    x, keep = _rows_last(x, mask, dim)
    sink = torch.broadcast_to(sink.to(x.dtype), (*x.shape[:-1], 1))
    kept = x if keep is None else x.masked_fill(~keep, float("-inf"))
    shift = torch.maximum(kept.amax(dim=-1, keepdim=True), sink).detach()
    exp = torch.exp(kept - shift)
    p = exp / (exp.sum(dim=-1, keepdim=True) + torch.exp(sink - shift))
    return p.movedim(-1, dim)


def softmax_sink_log_probs(x: Tensor, sink: Tensor, dim: int = -1) -> Tensor:
    """log w_j = x_j − log(e^{s} + Σ_k e^{x_k}), for the output layer's cross-entropy."""
    x_last = x.movedim(dim, -1)
    sink = torch.broadcast_to(sink.to(x.dtype), (*x_last.shape[:-1], 1))
    log_total = torch.logsumexp(torch.cat([x_last, sink], dim=-1), dim=-1, keepdim=True)
    return (x_last - log_total).movedim(-1, dim)


def entmax_alpha_masked(
    x: Tensor,
    alpha: Tensor,
    mask: Tensor | None = None,
    dim: int = -1,
    n_iter: int = ENTMAX_BISECT_ITERATIONS,
) -> Tensor:
    """α-entmax (Peters et al., 2019; α learned: Correia et al., 2019) by ``entmax_bisect``,
    differentiable in x and α: p_i = [(α − 1)·x_i − τ]_+^{1/(α − 1)} with τ such that Σ p = 1."""
    x_last, keep = _rows_last(x, mask, dim)
    if x_last.shape[-1] == 0:
        return x * 0
    alpha = torch.broadcast_to(alpha.to(x.dtype), (*x_last.shape[:-1], 1))
    h = x_last if keep is None else _fill_masked(x_last, keep, -1)
    p = entmax.entmax_bisect(h, alpha, dim=-1, n_iter=n_iter)
    return _zero_masked(p, keep).movedim(-1, dim)


def stickbreaking_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Stick-breaking attention (Tan et al., ICLR 2025) on a row of keys in position order, the
    query's own position last: β_j = sigmoid(x_j), w_j = β_j · Π_{kept k > j} (1 − β_k).

    The nearest kept key breaks the stick first; masked keys break nothing. The product is
    formed in log space: log(1 − β_k) = −softplus(x_k), summed from the row's end."""
    x, keep = _rows_last(x, mask, dim)
    log_rest = -F.softplus(x)
    if keep is not None:
        log_rest = torch.where(keep, log_rest, torch.zeros_like(log_rest))
    after = log_rest.flip(-1).cumsum(-1).flip(-1) - log_rest  # Σ over kept k > j
    p = torch.exp(F.logsigmoid(x) + after)
    return _zero_masked(p, keep).movedim(-1, dim)


class PerHeadNormalizer(Normalizer):
    """A normaliser with one learned value per attention head, or one per instance.

    ``num_heads``: None gives one scalar (shape (1,)) for every row; H gives shape (H,), and x
    must then have the heads on the axis two before ``dim`` once ``dim`` is moved last, i.e.
    (..., H, N, M) for ``dim=-1``, as :func:`multimax.attention` passes its scores.
    """

    per_head = True

    def __init__(self, num_heads: int | None = None) -> None:
        super().__init__()
        if num_heads is not None and (isinstance(num_heads, bool) or int(num_heads) < 1):
            raise ValueError(f"num_heads must be a positive integer or None, got {num_heads!r}")
        self.num_heads = None if num_heads is None else int(num_heads)

    def _per_head_shape(self) -> tuple[int, ...]:
        return (1,) if self.num_heads is None else (self.num_heads,)

    def head_view(self, param: Tensor, x: Tensor, dim: int = -1) -> Tensor:
        """``param`` shaped to broadcast against x with ``dim`` moved last."""
        if self.num_heads is None:
            return param.reshape(())
        rows = x.movedim(dim, -1).shape
        if len(rows) < 3 or rows[-3] != self.num_heads:
            raise ValueError(
                f"{type(self).__name__} has {self.num_heads} heads but got scores of shape "
                f"{tuple(x.shape)} (normalised along dim {dim}); pass (..., H, N, M) scores or "
                "build it with num_heads=None for one value shared by every row"
            )
        return param.reshape(self.num_heads, 1, 1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class Sigmoid(Normalizer):
    """Sigmoid attention: w_j = sigmoid(x_j + b), no row normalisation (rows need not sum to 1).

    ``logit_bias``: b; None (default) is −log n with n the row's unmasked keys.
    """

    mapping = "sigmoid"
    output_refusal = "its weights are independent sigmoids, not a distribution over classes"

    def __init__(self, logit_bias: float | None = None) -> None:
        super().__init__()
        self.logit_bias = None if logit_bias is None else float(logit_bias)

    def map_to_simplex(self, h: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
        return sigmoid_attention_weights(h, mask, dim, self.logit_bias)

    def extra_repr(self) -> str:
        return f"logit_bias={'-log n' if self.logit_bias is None else self.logit_bias}"


class Softpick(Normalizer):
    """Softpick: w_j = relu(e^{x_j} − 1) / (Σ_k |e^{x_k} − 1| + ε); rows sum to at most 1."""

    mapping = "softpick"
    output_refusal = (
        "its rows sum to less than one (negative scores get no mass), not a distribution"
    )

    def __init__(self, epsilon: float = SOFTPICK_EPSILON) -> None:
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"softpick epsilon must be > 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def map_to_simplex(self, h: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
        return softpick_masked(h, mask, dim, self.epsilon)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}"


class SSMax(PerHeadNormalizer):
    """Scalable-Softmax: softmax(s · log n · x), s learned (``scale``: per head, or one).

    ``transform`` alone uses n = the size of the last axis (the output layer, no mask); in
    ``forward`` n is each row's number of unmasked entries.
    """

    def __init__(self, num_heads: int | None = None, scale_init: float = SSMAX_SCALE_INIT) -> None:
        super().__init__(num_heads)
        self.scale_init = float(scale_init)
        self.scale = nn.Parameter(torch.full(self._per_head_shape(), self.scale_init))

    def transform(self, x: Tensor) -> Tensor:
        log_n = math.log(max(x.shape[-1], 1))
        return self.head_view(self.scale, x).to(x.dtype) * log_n * x

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dim: int = -1, bias: Tensor | None = None
    ) -> Tensor:
        h = upcast(x)
        scale = self.head_view(self.scale, h, dim).to(h.dtype)
        if bias is None:
            return ssmax_masked(h, scale, mask, dim).to(x.dtype)
        log_n = kept_count(h, mask, dim).clamp_min(1).log().movedim(dim, -1)
        scaled = (scale * log_n * h.movedim(dim, -1)).movedim(-1, dim) + upcast(bias)
        return softmax_masked(scaled, mask, dim).to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, scale_init={self.scale_init}"


class SoftmaxSink(PerHeadNormalizer):
    """Softmax with a learned sink logit (``sink``: per head, or one; init 0 = softmax₁):
    w_j = e^{x_j} / (e^{sink} + Σ_k e^{x_k}). ``learn_sink=False`` keeps it fixed."""

    mapping = "softmax_sink"

    def __init__(
        self, num_heads: int | None = None, sink_init: float = 0.0, learn_sink: bool = True
    ) -> None:
        super().__init__(num_heads)
        self.sink_init, self.learn_sink = float(sink_init), bool(learn_sink)
        sink = torch.full(self._per_head_shape(), self.sink_init)
        if learn_sink:
            self.sink = nn.Parameter(sink)
        else:
            self.register_buffer("sink", sink, persistent=False)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dim: int = -1, bias: Tensor | None = None
    ) -> Tensor:
        h = upcast(x) if bias is None else upcast(x) + upcast(bias)
        sink = self.head_view(self.sink, h, dim)
        return softmax_sink_masked(h, sink, mask, dim).to(x.dtype)

    def log_probs(self, x: Tensor, dim: int = -1) -> Tensor:
        """log w along ``dim`` (no mask): the output layer's log-probabilities."""
        h = upcast(x)
        return softmax_sink_log_probs(h, self.head_view(self.sink, h, dim), dim)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, sink_init={self.sink_init}, learn_sink={self.learn_sink}"
        )


class EntmaxAlpha(PerHeadNormalizer):
    """α-entmax with α learned (``alpha``: per head, or one; init 1.5), kept in (1, 2]: the
    value used is ``alpha`` clamped to [1 + 1e-3, 2]. At the output layer its loss is the
    Fenchel-Young loss of Ω_α (:mod:`multimax.losses`)."""

    mapping = "entmax_alpha"

    def __init__(self, num_heads: int | None = None, alpha_init: float = ENTMAX_ALPHA_INIT) -> None:
        super().__init__(num_heads)
        if not 1.0 < alpha_init <= 2.0:
            raise ValueError(f"entmax_alpha alpha_init must be in (1, 2], got {alpha_init}")
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full(self._per_head_shape(), self.alpha_init))

    def effective_alpha(self, x: Tensor, dim: int = -1) -> Tensor:
        """α in [1 + 1e-3, 2], shaped for x (with ``dim`` moved last)."""
        alpha = self.alpha.clamp(1.0 + ENTMAX_ALPHA_MIN_MARGIN, 2.0)
        return self.head_view(alpha, x, dim).to(x.dtype)

    def map_to_simplex(self, h: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
        return entmax_alpha_masked(h, self.effective_alpha(h, dim), mask, dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, alpha_init={self.alpha_init}"


class StickBreaking(Normalizer):
    """Stick-breaking attention, causal only: each row lists the keys its query may see in
    position order (the query's own last); w_j = β_j Π_{kept k > j} (1 − β_k), β = sigmoid(x).

    :func:`multimax.attention` refuses it without ``is_causal=True``; rows sum to at most 1.
    """

    mapping = "stickbreaking"
    causal_only = True
    output_refusal = (
        "it orders the entries by position (causal attention only), which classes have not"
    )

    def map_to_simplex(self, h: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
        return stickbreaking_masked(h, mask, dim)


# --- registry ---------------------------------------------------------------------------


class NormalizerRegistry(Mapping[str, type[Normalizer]]):
    """Name -> normaliser class. ``print(NORMALIZERS)`` lists the names."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Normalizer]] = {}

    def register(self, name: str) -> Callable[[type[Normalizer]], type[Normalizer]]:
        def decorator(cls: type[Normalizer]) -> type[Normalizer]:
            if name in self._classes:
                raise ValueError(f"normalizer {name!r} is already registered")
            self._classes[name] = cls
            cls.registry_name = name
            return cls

        return decorator

    def __getitem__(self, name: str) -> type[Normalizer]:
        if name not in self._classes:
            raise KeyError(f"unknown normalizer {name!r}; valid names: {', '.join(self._classes)}")
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"NORMALIZERS({', '.join(self._classes)})"


NORMALIZERS = NormalizerRegistry()
NORMALIZERS.register("softmax")(Softmax)
NORMALIZERS.register("sparsemax")(Sparsemax)
NORMALIZERS.register("entmax15")(Entmax15)
NORMALIZERS.register("evsoftmax")(EvSoftmax)
NORMALIZERS.register("sigmoid")(Sigmoid)
NORMALIZERS.register("softpick")(Softpick)
NORMALIZERS.register("ssmax")(SSMax)
NORMALIZERS.register("softmax_sink")(SoftmaxSink)
NORMALIZERS.register("entmax_alpha")(EntmaxAlpha)
NORMALIZERS.register("stickbreaking")(StickBreaking)


def attention_layer_options(name: str, num_heads: int) -> dict[str, int]:
    """What an attention layer with ``num_heads`` heads adds to normaliser ``name``'s options:
    ``{"num_heads": H}`` for a normaliser with per-head parameters, else nothing."""
    return {"num_heads": num_heads} if NORMALIZERS[name].per_head else {}


def check_output_normalizer(name: str, setting: str = "model.output_normalizer") -> None:
    """Refuse, in one line, a normaliser whose rows are not a distribution at the output."""
    reason = NORMALIZERS[name].output_refusal if name in NORMALIZERS else None
    if reason is not None:
        usable = [n for n, cls in NORMALIZERS.items() if cls.output_refusal is None]
        raise ValueError(
            f"{setting}={name} is refused: {reason}, so it cannot be an output layer; keep it "
            f"in attention and pick one of {', '.join(usable)} for the output"
        )


def default_output_normalizer(attention: str | Normalizer | None) -> str | Normalizer | None:
    """The output normaliser that follows the attention's: the same one, or ``"softmax"`` where
    its rows are not a distribution (sigmoid, softpick, stick-breaking)."""
    if isinstance(attention, Normalizer):
        cls: type[Normalizer] | None = type(attention)
    else:
        cls = NORMALIZERS.get(attention or "softmax")
    return "softmax" if cls is not None and cls.output_refusal is not None else attention


def check_causal_use(normalizer: Normalizer, is_causal: bool) -> None:
    """Refuse, in one line, a causal-only normaliser (stick-breaking) outside causal attention."""
    if normalizer.causal_only and not is_causal:
        name = getattr(normalizer, "registry_name", type(normalizer).__name__)
        raise ValueError(
            f"{name} attention is causal only (each query breaks a stick over the keys before "
            "it): use it in causal (decoder) self-attention with is_causal=True, not here"
        )


def build_normalizer(name: str | None = "softmax", **options) -> Normalizer:
    """Build a normaliser by registry name; ``None`` means plain softmax.

    ``options`` are the class's own keyword arguments (``order`` for multimax, ``temperature``
    and ``learn_temperature`` for softmax). Unknown names and options raise ``ValueError``
    naming what is valid.
    """
    name = "softmax" if name is None else name
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; valid names: {', '.join(NORMALIZERS)}")
    cls = NORMALIZERS[name]
    try:
        return cls(**options)
    except TypeError as err:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(
            f"normalizer {name!r} got options {sorted(options)}; it accepts "
            f"{accepted or 'no options'} ({err})"
        ) from err


__all__ = [
    "ENTMAX_ALPHA_INIT",
    "EVSOFTMAX_EPSILON",
    "SOFTPICK_EPSILON",
    "SSMAX_SCALE_INIT",
    "EntmaxAlpha",
    "PerHeadNormalizer",
    "SSMax",
    "Sigmoid",
    "SoftmaxSink",
    "Softpick",
    "StickBreaking",
    "attention_layer_options",
    "check_causal_use",
    "check_output_normalizer",
    "default_output_normalizer",
    "entmax_alpha_masked",
    "kept_count",
    "sigmoid_attention_weights",
    "softmax_sink_log_probs",
    "softmax_sink_masked",
    "softpick_masked",
    "ssmax_masked",
    "stickbreaking_masked",
    "MASKED_BIAS",
    "NORMALIZERS",
    "Entmax15",
    "EvSoftmax",
    "Normalizer",
    "NormalizerRegistry",
    "Softmax",
    "Sparsemax",
    "build_normalizer",
    "entmax15_masked",
    "evsoftmax_log_weights",
    "evsoftmax_masked",
    "softmax_masked",
    "sparsemax_masked",
]

"""Scaled dot-product attention with any normaliser, behind one function.

    attention(q, k, v, normalizer) = normalizer(q·kᵀ · scale, mask) · v

σ-style transforms see the raw scaled scores; an additive mask is added *after* the
transform and its entries at or below ``MASKED_BIAS`` (−10⁴: ``-inf``, fairseq's
−1e8, ``finfo.min``) count as masked. Masked keys get exactly zero weight and a query row
whose keys are all masked outputs zeros; inputs with no score at all (a batch, query or key
length of 0) give the empty or zero output on every path.

``attention`` picks an implementation from ``ATTENTION_PATHS`` (the first that can run and
whose ``auto`` rule holds, unless ``impl`` names one):

* ``sdpa``: PyTorch's fused kernels, softmax with a fixed temperature (plain softmax
  included) and Scalable-Softmax (its per-row factor s·log n folded into q): first, so
  softmax baselines run exactly what stock timm / fairseq run;
* ``flex``: FlexAttention with σ as ``score_mod`` (CUDA; flash-style, no N×M tensor;
  forward-only on the CPU, so only when forced there);
* ``inference``: σ fused into the softmax, nothing saved (no gradient needed);
* ``fused``: σ + softmax with its own memory-lean backward (:mod:`multimax.fused`);
* ``reference``: explicit N×M weights, every normaliser.

``inference`` and ``fused`` serve softmax-of-point-wise-σ normalisers (MultiMax, softmax
with temperature) and the row maps of :mod:`multimax.row_maps` (softmax with a sink logit,
sigmoid, softpick); α-entmax and stick-breaking run the reference. Every rule of the automatic choice is in this module, beside the
registry (section "the auto rules"); :mod:`multimax.flex` and :mod:`multimax.fused` only
say whether they can run. ``auto`` takes flex on CUDA only, and inference / fused only when
their kernels run compiled (:func:`multimax.compile_policy.use_compiled_kernels`: large
score tensors, or ``MULTIMAX_COMPILE=1``), since the uncompiled kernels are no faster than
the reference. :func:`use_attention_impl` overrides ``"auto"`` for a block of code
(benchmarks, debugging).

One module of ~410 lines on purpose: the path registry and the "auto" rules that choose
among its paths belong in one place, so that a reader finds every rule beside the paths.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .compile_policy import use_compiled_kernels
from .flex import flex_can_run, flex_sigma_attention
from .fused import fused_attention
from .normalizers import (
    MASKED_BIAS,
    Normalizer,
    Softmax,
    SSMax,
    build_normalizer,
    check_causal_use,
)
from .precision import upcast
from .row_maps import fused_spec
from .tensor_cache import TensorCache
from .tiling import num_scores


@dataclass(frozen=True)
class AttentionInputs:
    """What a path needs to decide whether it can run, and to run."""

    q: Tensor
    k: Tensor
    v: Tensor
    normalizer: Normalizer
    keep: Tensor | None  # bool, broadcastable to (B, H, N, M); True = keep
    bias: Tensor | None  # float, broadcastable to (B, H, N, M); added after the transform
    is_causal: bool
    dropout_p: float
    scale: float

    @property
    def needs_grad(self) -> bool:
        """Whether autograd will need gradients of this call (q, k, v, bias or parameters)."""
        if not torch.is_grad_enabled():
            return False
        tensors = (self.q, self.k, self.v, self.bias, *self.normalizer.parameters())
        return any(t is not None and t.requires_grad for t in tensors)

    @property
    def num_scores(self) -> int:
        """Entries of the (B, H, N, M) score tensor."""
        return num_scores(self.q, self.k)


@dataclass(frozen=True)
class AttentionPath:
    """``can_run``: whether the path is correct here (forcing it is allowed); ``auto``:
    whether ``impl="auto"`` should take it (defaults to ``can_run``)."""

    name: str
    can_run: Callable[[AttentionInputs], bool]
    run: Callable[[AttentionInputs], Tensor]
    description: str = ""
    auto: Callable[[AttentionInputs], bool] | None = None

    def auto_ok(self, inputs: AttentionInputs) -> bool:
        return self.can_run(inputs) and (self.auto is None or self.auto(inputs))


ATTENTION_PATHS: dict[str, AttentionPath] = {}


def register_attention_path(path: AttentionPath, first: bool = False) -> None:
    """Add a path; ``first=True`` puts it ahead of the existing ones for ``impl="auto"``."""
    items = list(ATTENTION_PATHS.items())
    items = [(n, p) for n, p in items if n != path.name]
    items = [(path.name, path), *items] if first else [*items, (path.name, path)]
    ATTENTION_PATHS.clear()
    ATTENTION_PATHS.update(items)


def _split_additive(mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    keep = mask > torch.tensor(MASKED_BIAS, dtype=mask.dtype, device=mask.device)
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return keep, torch.where(keep, mask, zero).to(dtype)


# Additive masks split once per mask tensor: every layer given the same mask object gets the
# same keep tensor, so flex builds its block mask once.
_SPLIT_MASKS = TensorCache(8)


def split_mask(mask: Tensor | None, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """(keep, bias) from a boolean (True = keep) or additive float mask; additive entries at
    or below ``MASKED_BIAS`` (in the mask's dtype) are masked, the others are the bias."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    if mask.requires_grad:  # a learned bias: its graph is new on every call
        return _split_additive(mask, dtype)
    return _SPLIT_MASKS.get([mask], (dtype,), lambda: _split_additive(mask, dtype))


def causal_keep(n: int, m: int, device: torch.device) -> Tensor:
    """Bool (N, M): query i sees keys j <= i + (M - N) (aligned to the end, as with a cache)."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril(diagonal=m - n)


def combined_keep(inputs: AttentionInputs) -> Tensor | None:
    keep = inputs.keep
    if inputs.is_causal:
        n, m = inputs.q.shape[-2], inputs.k.shape[-2]
        causal = causal_keep(n, m, inputs.q.device)
        keep = causal if keep is None else keep & causal
    return keep


def attention_weights(inputs: AttentionInputs) -> Tensor:
    """The (B, H, N, M) attention weights, explicitly (the reference computation)."""
    q, k = inputs.q, inputs.k
    scores = torch.matmul(q, k.transpose(-2, -1)) * inputs.scale
    return inputs.normalizer(scores, mask=combined_keep(inputs), bias=inputs.bias)


def _reference(inputs: AttentionInputs) -> Tensor:
    p = attention_weights(inputs)
    if inputs.dropout_p > 0:
        p = F.dropout(p, inputs.dropout_p, training=True)
    return torch.matmul(p.to(inputs.v.dtype), inputs.v)


def _sdpa_can_run(inputs: AttentionInputs) -> bool:
    n = inputs.normalizer
    return (isinstance(n, Softmax) and not n.learn_temperature) or isinstance(n, SSMax)


def _query_scale(inputs: AttentionInputs, keep: Tensor | None) -> float | Tensor:
    """What multiplies q·kᵀ before SDPA's softmax: scale / T for softmax; for SSMax
    scale · s_h · log n per query row (n: the row's unmasked keys, at least 1), shaped
    (..., H, N, 1) to multiply q."""
    normalizer = inputs.normalizer
    if isinstance(normalizer, Softmax):
        return inputs.scale / normalizer._fixed_temperature
    assert isinstance(normalizer, SSMax)
    m = inputs.k.shape[-2]
    count = keep.sum(-1, keepdim=True) if keep is not None else torch.tensor(m)
    dtype = upcast(inputs.q).dtype
    log_n = count.to(device=inputs.q.device, dtype=dtype).clamp_min(1).log()
    head_scale = normalizer.head_view(normalizer.scale, inputs.q).to(dtype)
    return inputs.scale * head_scale * log_n


def _sdpa(inputs: AttentionInputs) -> Tensor:
    keep = combined_keep(inputs)
    q, scale = inputs.q, _query_scale(inputs, keep)
    if isinstance(scale, Tensor):  # a factor per query row: folded into q
        q, scale = (upcast(q) * scale).to(q.dtype), 1.0
    attn_mask: Tensor | None = None
    empty_rows: Tensor | None = None
    if keep is not None:
        # SDPA gives NaN for a query with no key: such rows see every key, then are zeroed.
        # (No host sync on whether any such row exists: the two ops are cheap.)
        empty_rows = ~keep.any(dim=-1, keepdim=True)
        attn_mask = keep | empty_rows
    if inputs.bias is not None:
        # SDPA adds attn_mask to the scaled scores: softmax(x / T + bias), as the contract.
        bias = inputs.bias
        if attn_mask is not None:
            bias = torch.where(
                attn_mask, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device)
            )
        attn_mask = bias
    out = F.scaled_dot_product_attention(
        q, inputs.k, inputs.v, attn_mask=attn_mask, dropout_p=inputs.dropout_p, scale=scale
    )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _flex_can_run(inputs: AttentionInputs) -> bool:
    return flex_can_run(inputs.q, inputs.normalizer, inputs.dropout_p, inputs.needs_grad)[0]


def _flex(inputs: AttentionInputs) -> Tensor:
    return flex_sigma_attention(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.normalizer,
        keep=inputs.keep,
        bias=inputs.bias,
        is_causal=inputs.is_causal,
        scale=inputs.scale,
    )


def _fusable(inputs: AttentionInputs) -> bool:
    return fused_spec(inputs.normalizer) is not None


def _fused(inputs: AttentionInputs) -> Tensor:
    return fused_attention(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.normalizer,
        keep=inputs.keep,
        bias=inputs.bias,
        dropout_p=inputs.dropout_p,
        scale=inputs.scale,
        is_causal=inputs.is_causal,
    )


# --- the auto rules ------------------------------------------------------------------------
# ``impl="auto"`` takes the first registered path whose ``can_run`` and ``auto`` both hold;
# inputs with no score at all take the reference (see ``attention``).


def _auto_flex(inputs: AttentionInputs) -> bool:
    """On CUDA only: its flash kernel is the point; on the CPU FlexAttention has no
    backward, so it is taken there only when forced."""
    return inputs.q.is_cuda


def _auto_compiled(inputs: AttentionInputs) -> bool:
    """Only when the point-wise kernels run compiled: uncompiled they are no faster than
    the reference."""
    return use_compiled_kernels(inputs.num_scores)


# In auto order: SDPA first, so softmax baselines run exactly what stock timm / fairseq run.
register_attention_path(
    AttentionPath(
        "sdpa", _sdpa_can_run, _sdpa, "torch SDPA (fixed-temperature softmax, SSMax via q)"
    )
)
register_attention_path(
    AttentionPath(
        "flex",
        _flex_can_run,
        _flex,
        "FlexAttention, σ as score_mod (CUDA; CPU forward only), no dropout",
        auto=_auto_flex,
    )
)
register_attention_path(
    AttentionPath(
        "inference",
        lambda inputs: _fusable(inputs) and not inputs.needs_grad,
        _fused,
        "σ fused into the row map, nothing saved (no gradients; point-wise σ or a row map)",
        auto=_auto_compiled,
    )
)
register_attention_path(
    AttentionPath(
        "fused",
        _fusable,
        _fused,
        "fused σ + row map with its own backward (point-wise σ or a row map)",
        auto=_auto_compiled,
    )
)
register_attention_path(
    AttentionPath("reference", lambda inputs: True, _reference, "explicit weights, any normaliser")
)

_forced = threading.local()


@contextmanager
def use_attention_impl(impl: str) -> Iterator[None]:
    """Make ``impl="auto"`` calls inside the block use ``impl`` (``"auto"`` restores the
    automatic choice). Explicit ``impl=`` arguments are left alone.

    >>> with use_attention_impl("reference"):
    ...     model(x)
    """
    if impl != "auto" and impl not in ATTENTION_PATHS:
        raise ValueError(
            f"unknown attention impl {impl!r}; valid: auto, {', '.join(ATTENTION_PATHS)}"
        )
    previous = getattr(_forced, "impl", "auto")
    _forced.impl = impl
    try:
        yield
    finally:
        _forced.impl = previous


def select_path(inputs: AttentionInputs) -> str:
    """The name of the path ``impl="auto"`` takes for these inputs."""
    for name, path in ATTENTION_PATHS.items():
        if path.auto_ok(inputs):
            return name
    raise RuntimeError("no attention path can run these inputs")  # reference always can


_recording = threading.local()


@contextmanager
def record_attention() -> Iterator[list[Tensor]]:
    """Collect the weights of every :func:`attention` call made inside the block.

    Yields a list that receives one detached (B, H, N, M) tensor per call, in call order
    (i.e. layer order for one forward pass). Calls inside run through the reference path.

    >>> with record_attention() as weights:
    ...     model(x)
    """
    previous = getattr(_recording, "sink", None)
    sink: list[Tensor] = []
    _recording.sink = sink
    try:
        yield sink
    finally:
        _recording.sink = previous


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: Normalizer | str | None,
    mask: Tensor | None,
    is_causal: bool,
    dropout_p: float,
    scale: float | None,
) -> AttentionInputs:
    if not isinstance(normalizer, Normalizer):
        normalizer = build_normalizer(normalizer)
    check_causal_use(normalizer, is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    keep, bias = split_mask(mask, q.dtype)
    return AttentionInputs(q, k, v, normalizer, keep, bias, is_causal, dropout_p, scale)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: Normalizer | str | None = None,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    impl: str = "auto",
) -> Tensor:
    """Attention output (B, H, N, Dv) for q (B, H, N, D), k (B, H, M, D), v (B, H, M, Dv).

    ``mask``: bool (True = keep) or additive float, broadcastable to (B, H, N, M).
    ``is_causal``: query i attends to keys j <= i (+ M − N when M > N, as with a KV cache).
    ``dropout_p``: dropout on the weights, applied whenever > 0 (pass 0 at evaluation).
    ``scale``: defaults to 1/√D. ``impl``: ``"auto"`` or a name in ``ATTENTION_PATHS``.
    """
    inputs = _prepare(q, k, v, normalizer, mask, is_causal, dropout_p, scale)
    normalizer = inputs.normalizer
    sink = getattr(_recording, "sink", None)
    if sink is not None:
        weights = attention_weights(inputs)
        sink.append(weights.detach())
        if dropout_p > 0:
            weights = F.dropout(weights, dropout_p, training=True)
        return torch.matmul(weights.to(v.dtype), v)
    if impl == "auto":
        impl = getattr(_forced, "impl", "auto")
    if impl == "auto":
        path = ATTENTION_PATHS[select_path(inputs)]
        return _reference(inputs) if inputs.num_scores == 0 else path.run(inputs)
    if impl not in ATTENTION_PATHS:
        raise ValueError(
            f"unknown attention impl {impl!r}; valid: auto, {', '.join(ATTENTION_PATHS)}"
        )
    path = ATTENTION_PATHS[impl]
    if not path.can_run(inputs):
        runnable = [name for name, p in ATTENTION_PATHS.items() if p.can_run(inputs)]
        raise ValueError(
            f"attention impl {impl!r} ({path.description}) cannot run here "
            f"(normalizer={type(normalizer).__name__}, device={q.device.type}, "
            f"dtype={q.dtype}, torch={torch.__version__}); paths that can: {', '.join(runnable)}"
        )
    # No score at all: every path's answer is the (empty or zero) reference one.
    return _reference(inputs) if inputs.num_scores == 0 else path.run(inputs)


def attention_with_weights(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: Normalizer | str | None = None,
    mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(output, weights) through the reference path, for diagnostics and analysis."""
    inputs = _prepare(q, k, v, normalizer, mask, is_causal, 0.0, scale)
    weights = attention_weights(inputs)
    return torch.matmul(weights.to(v.dtype), v), weights

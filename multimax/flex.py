"""FlexAttention with σ as its ``score_mod``: flash-style attention, no N×M tensor.

FlexAttention computes softmax(score_mod(q·kᵀ·scale)) · v blockwise; MultiMax's σ is a
point-wise score modification, so ``score_mod(s) = σ(s) + bias`` is exactly the normaliser's
transform followed by the additive mask (σ sees the raw scores, the mask comes after). Boolean masks and causality become a
``mask_mod`` / block mask, so masked keys get exactly zero weight and a query with no key
returns zeros. σ's parameters are tensors captured by ``score_mod``; FlexAttention's backward
(CUDA) returns their gradients.

The kernel is compiled as :func:`multimax.compile_policy.use_compiled_flex` says (on CUDA;
on the CPU, forward only, for large inputs) through
:class:`multimax.compile_policy.CompiledKernel`: one graph per input pattern with dynamic sizes, so
batches of new lengths do not recompile, and eager FlexAttention (one warning) where a
pattern does not compile. A block mask is built once per (sizes, mask) and reused by every
layer that gets the same mask tensor; it broadcasts over batch and heads wherever the mask
does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compile_policy import kernel, use_compiled_flex
from .normalizers import Normalizer
from .precision import autocast_cast, autocast_disabled
from .sigma import pointwise_sigma
from .tensor_cache import TensorCache, compact_mask
from .tiling import attention_without_scores, num_scores

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    FLEX_AVAILABLE = True
except ImportError:  # pragma: no cover - older torch
    FLEX_AVAILABLE = False


def flex_can_run(
    q: Tensor, normalizer: Normalizer, dropout_p: float, needs_grad: bool
) -> tuple[bool, str]:
    """(can run, why not): point-wise σ, no dropout, CUDA (or CPU forward only)."""
    if not FLEX_AVAILABLE:
        return False, f"torch {torch.__version__} has no FlexAttention"
    if pointwise_sigma(normalizer) is None:
        return False, f"{type(normalizer).__name__} is not softmax of a point-wise σ"
    if dropout_p > 0:
        return False, "FlexAttention has no attention dropout"
    if q.device.type != "cuda" and needs_grad:
        return False, "FlexAttention's backward needs CUDA"
    return True, ""


def _at(t: Tensor, b, h, qi, ki):
    """t[b, h, qi, ki] for a compact mask (size-1 dimensions broadcast)."""
    index = [b, h, qi, ki]
    return t[tuple(0 if size == 1 else i for size, i in zip(t.shape, index, strict=True))]


def _flex_kernel(sigma, q, k, v, bias, block_mask, scale, params):
    """FlexAttention with score_mod(s) = σ(s) + bias: a pure function, compiled whole."""

    def score_mod(score, b, h, qi, ki):
        out = sigma.forward(score, *params)
        if bias is not None:
            out = out + _at(bias, b, h, qi, ki)
        return out

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


# Block masks by (mask tensor, sizes, causality): one per mask and shape, not one per call.
_BLOCK_MASKS = TensorCache(16)


def block_mask_for(keep: Tensor | None, is_causal: bool, q: Tensor, k: Tensor):
    """The BlockMask of ``keep`` (bool, True = keep) and causality for q (B, H, N, ·) and
    k (·, ·, M, ·), or None when nothing is masked. Built once per (mask tensor, sizes) and
    reused while that tensor lives unchanged (every layer that gets the same mask object);
    batch and head dimensions the mask broadcasts over stay broadcast (size 1)."""
    if keep is None and not is_causal:
        return None
    b, h, n = q.shape[:3]
    m = k.shape[-2]

    def build():
        compact = compact_mask(keep, 4)
        # A tensor, not a Python int: the compiled kernel would specialise on an int's value.
        offset = torch.tensor(m - n, device=q.device)

        def mask_mod(bi, hi, qi, ki):
            allowed = qi + offset >= ki if is_causal else None
            if compact is not None:
                kept = _at(compact, bi, hi, qi, ki)
                allowed = kept if allowed is None else allowed & kept
            return allowed

        mask_b, mask_h = (1, 1) if compact is None else compact.shape[:2]
        return create_block_mask(mask_mod, mask_b, mask_h, n, m, device=q.device)

    return _BLOCK_MASKS.get([keep], (q.device, b, h, n, m, is_causal), build)


def flex_sigma_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: Normalizer,
    keep: Tensor | None = None,
    bias: Tensor | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
    compiled: bool | None = None,
) -> Tensor:
    """softmax(σ(q·kᵀ·scale) + bias) · v through FlexAttention; masked keys get zero weight.

    ``keep``: bool broadcastable to (B, H, N, M), True = keep; ``is_causal`` aligns the
    diagonal to the end (query i sees keys j <= i + M − N), as the reference does.
    ``compiled=None`` follows :func:`multimax.compile_policy.use_compiled_flex`. Under
    autocast q, k, v are cast as autocast casts a matrix product's inputs.
    """
    sigma = pointwise_sigma(normalizer)
    if sigma is None:
        raise ValueError(f"{type(normalizer).__name__} has no point-wise σ for FlexAttention")
    (q, k, v), autocast_on = autocast_cast(q, k, v)
    if autocast_on:
        with autocast_disabled(q.device.type):
            return flex_sigma_attention(q, k, v, normalizer, keep, bias, is_causal, scale, compiled)
    if num_scores(q, k) == 0:
        return attention_without_scores(q, k, v, sigma, sigma.params(normalizer), scale)
    if q.device.type != "cuda" and not torch.is_grad_enabled():
        # CPU flex refuses inputs that require grad, even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
    params = tuple(p.to(torch.float32) for p in sigma.params(normalizer))
    bias = compact_mask(None if bias is None else bias.to(torch.float32), 4)
    block_mask = block_mask_for(keep, is_causal, q, k)
    if compiled is None:
        compiled = use_compiled_flex(q.is_cuda, num_scores(q, k))
    if not compiled:
        import warnings

        # Unfused flex warns that it is unfused; that is the point of using it here.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    run = kernel(_flex_kernel, sigma, compiled)
    return run(q, k, v, bias, block_mask, scale, params)


__all__ = [
    "FLEX_AVAILABLE",
    "block_mask_for",
    "flex_can_run",
    "flex_sigma_attention",
]

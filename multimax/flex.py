"""FlexAttention with σ as its ``score_mod``: flash-style attention, no N×M tensor.

FlexAttention computes softmax(score_mod(q·kᵀ·scale)) · v blockwise; MultiMax's σ is a
point-wise score modification, so ``score_mod(s) = σ(s) + bias`` is exactly the normaliser's
transform followed by the additive mask (BRIEF §1). Boolean masks and causality become a
``mask_mod`` / block mask, so masked keys get exactly zero weight and a query with no key
returns zeros. σ's parameters are tensors captured by ``score_mod``; FlexAttention's backward
(CUDA) returns their gradients.

Fused (compiled) kernels exist on CUDA; on the CPU the forward runs unfused (for tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import pointwise_sigma
from .normalizers import Normalizer

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    FLEX_AVAILABLE = True
except ImportError:  # pragma: no cover - older torch
    FLEX_AVAILABLE = False

_compiled_flex = None


def _flex_kernel(device: torch.device):
    """torch.compile'd flex_attention on CUDA (fused kernel); the unfused one elsewhere."""
    global _compiled_flex
    if device.type != "cuda":
        import warnings

        # Unfused CPU flex warns that it is unfused; that is the point of using it here.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


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


def _expand4(t: Tensor, b: int, h: int, n: int, m: int) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t.expand(b, h, n, m)


def flex_sigma_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: Normalizer,
    keep: Tensor | None = None,
    bias: Tensor | None = None,
    is_causal: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """softmax(σ(q·kᵀ·scale) + bias) · v through FlexAttention; masked keys get zero weight.

    ``keep``: bool broadcastable to (B, H, N, M), True = keep; ``is_causal`` aligns the
    diagonal to the end (query i sees keys j <= i + M − N), as the reference does.
    """
    sigma = pointwise_sigma(normalizer)
    if sigma is None:
        raise ValueError(f"{type(normalizer).__name__} has no point-wise σ for FlexAttention")
    if q.device.type != "cuda" and not torch.is_grad_enabled():
        # CPU flex refuses inputs that require grad, even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
    params = tuple(p.to(torch.float32) for p in sigma.params(normalizer))
    b, h, n, _ = q.shape
    m = k.shape[-2]
    bias4 = None if bias is None else _expand4(bias.to(torch.float32), b, h, n, m)

    def score_mod(score, bi, hi, qi, ki):
        out = sigma.forward(score, *params)
        if bias4 is not None:
            out = out + bias4[bi, hi, qi, ki]
        return out

    block_mask = None
    if keep is not None or is_causal:
        keep4 = None if keep is None else _expand4(keep, b, h, n, m)
        offset = m - n

        def mask_mod(bi, hi, qi, ki):
            allowed = qi + offset >= ki if is_causal else None
            if keep4 is not None:
                kept = keep4[bi, hi, qi, ki]
                allowed = kept if allowed is None else allowed & kept
            return allowed

        block_mask = create_block_mask(mask_mod, b, h, n, m, device=q.device)
    return _flex_kernel(q.device)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


__all__ = ["FLEX_AVAILABLE", "flex_can_run", "flex_sigma_attention"]

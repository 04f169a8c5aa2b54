"""σ + cross-entropy for large vocabularies, computed in chunks of tokens.

For logits z (T, V), a point-wise σ, label smoothing ε and targets t:

    h = σ(z),  ℓ = logsumexp(h),  loss = ℓ − (1 − ε)·h_t − (ε / V)·Σ_j h_j
    ∂loss/∂z = (softmax(h) − q) ⊙ σ'(z),   q = (1 − ε)·onehot(t) + ε / V
    ∂loss/∂θ = Σ (softmax(h) − q) ⊙ ∂σ/∂θ(z)

which is ``F.cross_entropy(σ(z), t, label_smoothing=ε)`` per token. The forward keeps only
the logits it was given and one ℓ per token; the backward recomputes σ and softmax chunk by
chunk and writes the logits' gradient straight into one (T, V) buffer. Autograd through the
plain formula would instead keep several (T, V) tensors (σ's intermediates, its output and
the log-softmax); here no more than the logits and their gradient exist at full size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused import PointwiseSigma, kernel, pointwise_sigma, upcast, use_compiled_kernels
from .normalizers import Normalizer

# Elements of one chunk (tokens × vocabulary): a few MiB, so chunk temporaries stay small.
CHUNK_ELEMENTS = 1 << 21


def _ce_forward_kernel(sigma, z, target, smoothing, params):
    x = upcast(z)
    h = sigma.forward(x, *params)
    m = h.amax(-1, keepdim=True)
    lse = m + torch.log(torch.exp(h - m).sum(-1, keepdim=True))
    # σ of the gathered logit, not a gather of σ: a gather from a fused σ defeats
    # vectorisation in the compiled kernel (several times slower on the CPU).
    h_t = sigma.forward(x.gather(-1, target.unsqueeze(-1)), *params)
    loss = lse - (1.0 - smoothing) * h_t - smoothing * h.mean(-1, keepdim=True)
    return loss.squeeze(-1), lse.squeeze(-1)


def _ce_backward_kernel(sigma, z, target, lse, grad, smoothing, params):
    """(dz without the target term, dz's target entries, dθ). With q = (1 − ε)·onehot + ε/V,
    dh = g·(p − ε/V) − g·(1 − ε)·onehot: the one-hot part is applied to the gathered target
    entries alone (then scattered by the caller), keeping the big loop free of indexing."""
    x = upcast(z)
    h = sigma.forward(x, *params)
    vocab = h.shape[-1]
    g = grad.unsqueeze(-1)
    dh = g * (torch.exp(h - lse.unsqueeze(-1)) - smoothing / vocab)
    dx, dparams = sigma.backward(x, dh, *params)
    x_t = x.gather(-1, target.unsqueeze(-1))
    dx_t, dparams_t = sigma.backward(x_t, -(1.0 - smoothing) * g, *params)
    return dx.to(z.dtype), dx_t.to(z.dtype), dparams + dparams_t


def _chunks(rows: int, vocab: int, chunk_rows: int | None) -> list[tuple[int, int]]:
    step = chunk_rows or max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


class ChunkedSigmaCrossEntropy(torch.autograd.Function):
    """Per-token loss (T,) of σ + cross-entropy; zero (and no gradient) where ignored."""

    @staticmethod
    def forward(ctx, logits, target, sigma, smoothing, ignore_index, chunk_rows, compiled, *params):
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        rows, vocab = logits.shape
        loss = torch.empty(rows, dtype=upcast(logits).dtype, device=logits.device)
        lse = torch.empty_like(loss)
        fwd = kernel(_ce_forward_kernel, sigma, compiled)
        for i, j in _chunks(rows, vocab, chunk_rows):
            loss[i:j], lse[i:j] = fwd(logits[i:j], safe[i:j], smoothing, params)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        ctx.save_for_backward(logits, safe, valid, lse, *params)
        ctx.meta = (sigma, smoothing, chunk_rows, compiled)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse, *params = ctx.saved_tensors
        sigma, smoothing, chunk_rows, compiled = ctx.meta
        rows, vocab = logits.shape
        grad = torch.where(valid, grad_loss, torch.zeros_like(grad_loss)).to(lse.dtype)
        d_logits = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        d_params = None
        bwd = kernel(_ce_backward_kernel, sigma, compiled)
        for i, j in _chunks(rows, vocab, chunk_rows):
            dx, dx_t, dp = bwd(logits[i:j], safe[i:j], lse[i:j], grad[i:j], smoothing, params)
            if d_logits is not None:
                d_logits[i:j] = dx
                d_logits[i:j].scatter_add_(-1, safe[i:j].unsqueeze(-1), dx_t)
            d_params = dp if d_params is None else d_params + dp
        grads, offset = [], 0
        for param in params:
            n = param.numel()
            grads.append(d_params[offset : offset + n].reshape(param.shape).to(param.dtype))
            offset += n
        return (d_logits, None, None, None, None, None, None, *grads)


def supports_chunked(normalizer: Normalizer) -> bool:
    """Whether σ + cross-entropy of this normaliser can run chunked (softmax of point-wise σ)."""
    return pointwise_sigma(normalizer) is not None


def sigma_cross_entropy(
    logits: Tensor,
    target: Tensor,
    normalizer: Normalizer,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """Per-token ``cross_entropy(σ(logits), target, label_smoothing)``, shape ``target.shape``,
    computed chunk by chunk (``chunk_rows`` tokens at a time; default ~2M entries a chunk).

    ``compiled=None`` follows :func:`multimax.fused.use_compiled_kernels` on the logits' size.
    """
    sigma: PointwiseSigma | None = pointwise_sigma(normalizer)
    if sigma is None:
        raise ValueError(
            f"{type(normalizer).__name__} is not softmax of a point-wise σ; use NormalizerLoss"
        )
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    if compiled is None:
        compiled = use_compiled_kernels(flat.numel())
    params = tuple(sigma.params(normalizer))
    loss = ChunkedSigmaCrossEntropy.apply(
        flat,
        target.reshape(-1),
        sigma,
        float(label_smoothing),
        ignore_index,
        chunk_rows,
        compiled,
        *params,
    )
    return loss.reshape(target.shape)


__all__ = ["CHUNK_ELEMENTS", "ChunkedSigmaCrossEntropy", "sigma_cross_entropy", "supports_chunked"]

"""σ + cross-entropy for large vocabularies, computed in chunks of tokens.

For logits z (T, V), a point-wise σ, label smoothing ε and targets t:

    h = σ(z),  ℓ = logsumexp(h),  loss = ℓ − (1 − ε)·h_t − (ε / V)·Σ_j h_j
    ∂loss/∂z = (softmax(h) − q) ⊙ σ'(z),   q = (1 − ε)·onehot(t) + ε / V
    ∂loss/∂θ = Σ (softmax(h) − q) ⊙ ∂σ/∂θ(z)

which is ``F.cross_entropy(σ(z), t, label_smoothing=ε)`` per token. The forward keeps only
the logits it was given and ℓ per token (as its row max and log-sum, see the kernel); the
backward recomputes σ and softmax chunk by chunk in float32 and writes the logits' gradient
straight into one (T, V) buffer, rounded to the logits' dtype once. Autograd through the
plain formula would instead keep several (T, V) tensors (σ's intermediates, its output and
the log-softmax); here no more than the logits and their gradient exist at full size.

A second derivative (``create_graph=True``) differentiates the plain formula instead (the
chunked backward is exact for first derivatives only); autocast does not reach inside (the
loss is float32 math either way); zero tokens give an empty loss with zero gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compile_policy import kernel, use_compiled_kernels
from .cross_entropy_rows import sigma_ce_terms, softmax_minus_target
from .function_grads import autograd_backward, split_params
from .normalizers import Normalizer
from .precision import autocast_disabled, upcast
from .sigma import PointwiseSigma, pointwise_sigma

# Elements of one chunk (tokens × vocabulary): a few MiB, so chunk temporaries stay small.
CHUNK_ELEMENTS = 1 << 21


def _ce_forward_kernel(sigma, z, target, smoothing, params):
    _, m, log_s, _, loss = sigma_ce_terms(sigma, upcast(z), target, smoothing, params)
    # logsumexp kept as (m, log s), not m + log s: rounding their sum would cost
    # p_t = exp(h_t − m − log s) the accuracy that 1 − p_t needs at a confident target.
    return loss.squeeze(-1), torch.cat([m, log_s], dim=-1)


def _ce_backward_kernel(sigma, z, target, stats, grad, smoothing, params):
    """(dz, dθ) of one chunk, in float32 (float64 stays float64): dh = g·(p − q)
    (:func:`softmax_minus_target`); the caller rounds dz to the logits' dtype once."""
    x = upcast(z)
    h = sigma.forward(x, *params)
    dh = grad.unsqueeze(-1) * softmax_minus_target(h, stats[:, :1], stats[:, 1:], target, smoothing)
    return sigma.backward(x, dh, *params)


def _plain_loss(sigma, z, target, smoothing, params):
    """The per-token loss by the formula, with autograd (for second derivatives)."""
    h = sigma.forward(upcast(z), *params)
    h_t = h.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(h, -1) - (1.0 - smoothing) * h_t - smoothing * h.mean(-1)


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
        stats = loss.new_empty(rows, 2)  # per token: row max m and log Σ exp(h − m)
        fwd = kernel(_ce_forward_kernel, sigma, compiled)
        for i, j in _chunks(rows, vocab, chunk_rows):
            loss[i:j], stats[i:j] = fwd(logits[i:j], safe[i:j], smoothing, params)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        ctx.save_for_backward(logits, safe, valid, stats, *params)
        ctx.meta = (sigma, smoothing, chunk_rows, compiled)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, stats, *params = ctx.saved_tensors
        sigma, smoothing, chunk_rows, compiled = ctx.meta
        grad = torch.where(valid, grad_loss, torch.zeros_like(grad_loss)).to(stats.dtype)
        if torch.is_grad_enabled():  # create_graph=True: a second derivative will be taken
            with torch.enable_grad():
                loss = _plain_loss(sigma, logits, safe, smoothing, params)
                needed = (ctx.needs_input_grad[0], *ctx.needs_input_grad[7:])
                d_logits, *d_params = autograd_backward(loss, (logits, *params), needed, grad)
            return (d_logits, None, None, None, None, None, None, *d_params)
        rows, vocab = logits.shape
        d_logits = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        d_params = torch.zeros(
            sum(p.numel() for p in params), dtype=stats.dtype, device=grad.device
        )
        bwd = kernel(_ce_backward_kernel, sigma, compiled)
        with autocast_disabled(logits.device.type):
            for i, j in _chunks(rows, vocab, chunk_rows):
                dx, dp = bwd(logits[i:j], safe[i:j], stats[i:j], grad[i:j], smoothing, params)
                if d_logits is not None:
                    d_logits[i:j] = dx  # float32 -> the logits' dtype: one rounding
                d_params = d_params + dp
        return (d_logits, None, None, None, None, None, None, *split_params(d_params, params))


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

    ``compiled=None`` follows :func:`multimax.compile_policy.use_compiled_kernels` on the logits' size.
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
    with autocast_disabled(flat.device.type):
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

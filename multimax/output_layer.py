"""σ + cross-entropy straight from the output layer's input: the (T, V) logits never exist.

For hidden states x (T, d), the output layer's weight W (V, d) and bias b (V,), a point-wise
σ, label smoothing ε and targets t:

    z = x·Wᵀ + b,   h = σ(z),   ℓ = logsumexp(h)
    loss_t = ℓ − (1 − ε)·h_t − (ε / V)·Σ_j h_j          (F.cross_entropy(σ(z), t, ε))
    g = ∂loss_t/∂z = (softmax(h) − q) ⊙ σ'(z),           q = (1 − ε)·onehot(t) + ε / V
    ∂/∂x = g·W,   ∂/∂W = gᵀ·x,   ∂/∂b = Σ_t g,   ∂/∂θ = Σ (softmax(h) − q) ⊙ ∂σ/∂θ(z)

Computed ``chunk_tokens`` tokens at a time: one chunk's z and g (C × V) are the only
vocabulary-sized temporaries. For a summed or averaged loss (what training uses) the
gradients are formed in the forward itself, chunk by chunk (three matrix products, as
``linear`` + ``cross_entropy`` take), and the backward only scales them by the incoming
gradient; for per-token losses (``reduction="none"``) the backward recomputes each chunk's
z (one more product), and so does float16 (the loss scale must reach g before it is
rounded). The point-wise work (σ, the row's log-sum-exp, g, σ's parameter sums)
is one kernel per chunk, compiled like the attention kernels (:mod:`multimax.compile_policy`), in
float32 (float64 stays float64); the products run in the inputs' dtype (bfloat16 / float16
as autocast would run ``linear``), g is rounded to it once, and W's and b's gradients add up
over chunks in float32. A second derivative (``create_graph=True``) differentiates the plain
formula instead; zero tokens give an empty or zero loss with zero gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .compile_policy import kernel, use_compiled_kernels
from .cross_entropy_rows import sigma_ce_terms, softmax_minus_target
from .function_grads import autograd_backward, split_params
from .normalizers import Normalizer
from .precision import autocast_disabled, upcast
from .sigma import PointwiseSigma, pointwise_sigma

# Logits per chunk (tokens × vocabulary), and the fewest tokens a chunk takes: matrix
# products with fewer rows stream W once per few rows and run well below the BLAS's speed.
CHUNK_ENTRIES = 1 << 25
MIN_CHUNK_TOKENS = 128

REDUCTIONS = ("mean", "sum", "none")


def _loss_kernel(sigma, z, target, smoothing, params):
    """(smoothed loss, −log p(target)) per token of one chunk of logits z (C, V)."""
    _, m, log_s, h_t, loss = sigma_ce_terms(sigma, upcast(z), target, smoothing, params)
    return loss.squeeze(-1), ((m - h_t) + log_s).squeeze(-1)


def _loss_and_grad_kernel(sigma, z, target, weight, smoothing, params):
    """(loss, −log p(target), g in z's dtype, dθ) of one chunk, where each token's gradient is
    scaled by ``weight`` (C,): 1, 1/n or the incoming gradient, 0 where ignored; g·(p − q)
    in one expression (:func:`multimax.chunked_loss.softmax_minus_target`)."""
    x = upcast(z)
    h, m, log_s, h_t, loss = sigma_ce_terms(sigma, x, target, smoothing, params)
    dh = weight.unsqueeze(-1) * softmax_minus_target(h, m, log_s, target, smoothing)
    dx, dparams = sigma.backward(x, dh, *params)
    return loss.squeeze(-1), ((m - h_t) + log_s).squeeze(-1), dx.to(z.dtype), dparams


def _plain_losses(sigma, x, weight, bias, target, smoothing, params):
    """Per-token (loss, nll) by the formula, with autograd (second derivatives, tests)."""
    z = torch.nn.functional.linear(x, weight, bias)
    h = sigma.forward(upcast(z), *params)
    h_t = h.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(h, -1)
    return lse - (1.0 - smoothing) * h_t - smoothing * h.mean(-1), lse - h_t


def chunk_bounds(tokens: int, vocab: int, chunk_tokens: int | None) -> list[tuple[int, int]]:
    """[(start, end)] of the token chunks: ``chunk_tokens`` each, or by default about
    ``CHUNK_ENTRIES`` logits but at least ``MIN_CHUNK_TOKENS`` tokens."""
    step = chunk_tokens or max(MIN_CHUNK_TOKENS, CHUNK_ENTRIES // max(vocab, 1))
    return [(i, min(i + step, tokens)) for i in range(0, tokens, step)]


def _logits(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


class _Grads:
    """Gradient buffers of x, W, b and θ, filled chunk by chunk (W, b, θ in float32)."""

    def __init__(self, x, weight, bias, params, needs: Sequence[bool]) -> None:
        acc = upcast(weight).dtype
        need_x, need_w, need_b = needs
        self.x = torch.empty_like(x) if need_x else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        self.params = torch.zeros(sum(p.numel() for p in params), dtype=acc, device=x.device)

    def add(self, i: int, j: int, g: Tensor, x_chunk: Tensor, weight: Tensor, d_par: Tensor):
        if self.x is not None:
            torch.mm(g, weight, out=self.x[i:j])
        if self.w is not None:
            if self.w.dtype == g.dtype:
                self.w.addmm_(g.t(), x_chunk)
            else:  # half precision: the chunk's product in its dtype, the sum in float32
                self.w.add_(torch.mm(g.t(), x_chunk))
        if self.b is not None:
            self.b.add_(g.sum(0, dtype=self.b.dtype))
        self.params += d_par


def _token_weights(valid: Tensor, reduction: str, grad: Tensor) -> Tensor:
    """Each token's factor on its gradient: the incoming gradient (per token, or the
    reduced loss's scalar), over the count of valid tokens for a mean, 0 where ignored."""
    weight = torch.where(valid, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    if reduction == "mean":
        weight = weight / valid.sum().clamp_min(1)
    return weight


def _reduce(losses: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """Per-token losses (0 where ignored) summed, averaged over the valid tokens, or kept."""
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.sum() / valid.sum().clamp_min(1)
    return losses


def _gradient_pass(run, x, weight, bias, safe, weight_t, smoothing, chunk, params, needs, out=None):
    """One walk over the token chunks with the loss-and-gradient kernel: the gradients of x,
    W, b and θ, and (into ``out`` = (losses, nll), when given) each token's loss and nll."""
    grads = _Grads(x, weight, bias, params, needs)
    for i, j in chunk_bounds(x.shape[0], weight.shape[0], chunk):
        z = _logits(x[i:j], weight, bias)
        loss, nll, g, d_par = run(z, safe[i:j], weight_t[i:j], smoothing, params)
        del z
        if out is not None:
            out[0][i:j], out[1][i:j] = loss, nll
        grads.add(i, j, g, x[i:j], weight, d_par)
        del g
    return grads


class LinearSigmaCrossEntropy(torch.autograd.Function):
    """(per-token or reduced loss, per-token −log p(target)) of σ + cross-entropy on
    x·Wᵀ + b, chunk by chunk; the second output carries no gradient."""

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        target,
        sigma,
        smoothing,
        ignore_index,
        reduction,
        chunk,
        compiled,
        *params,
    ):
        valid = target != ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        tokens, vocab = x.shape[0], weight.shape[0]
        losses = torch.zeros(tokens, dtype=upcast(weight).dtype, device=x.device)
        nll = torch.zeros_like(losses)
        needs = ctx.needs_input_grad
        # float16 recomputes in the backward, where the loss scale reaches g before it is
        # rounded to float16 (formed here, unscaled, small entries would flush to zero).
        want_grad = reduction != "none" and x.dtype != torch.float16
        want_grad = want_grad and (any(needs[:3]) or any(needs[10:]))
        ctx.meta = (sigma, smoothing, reduction, chunk, compiled)
        ctx.grads = None
        if want_grad:
            # A summed or averaged loss: its gradients are formed here, scaled in backward.
            weight_t = _token_weights(valid, reduction, torch.ones((), dtype=losses.dtype))
            run = kernel(_loss_and_grad_kernel, sigma, compiled, recompute=True)
            args = (x, weight, bias, safe, weight_t, smoothing, chunk, params, needs[:3])
            ctx.grads = _gradient_pass(run, *args, out=(losses, nll))
        else:
            run = kernel(_loss_kernel, sigma, compiled, recompute=True)
            for i, j in chunk_bounds(tokens, vocab, chunk):
                losses[i:j], nll[i:j] = run(
                    _logits(x[i:j], weight, bias), safe[i:j], smoothing, params
                )
        ctx.save_for_backward(x, weight, bias, safe, valid, *params)
        losses = torch.where(valid, losses, torch.zeros_like(losses))
        nll = torch.where(valid, nll, torch.zeros_like(nll))
        ctx.mark_non_differentiable(nll)
        return _reduce(losses, valid, reduction), nll

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll):
        x, weight, bias, safe, valid, *params = ctx.saved_tensors
        sigma, smoothing, reduction, chunk, compiled = ctx.meta
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a second derivative will be taken
            return _differentiable_backward(ctx, grad_loss)
        grads = ctx.grads
        ctx.grads = None
        if grads is not None:  # formed in the forward: scale by the incoming (scalar) gradient
            scale = grad_loss.to(grads.params.dtype)
            for name in ("x", "w", "b", "params"):
                buffer = getattr(grads, name)
                if buffer is not None:
                    buffer.mul_(scale.to(buffer.dtype))
        else:  # per-token losses (or a second backward): recompute every chunk
            weight_t = _token_weights(valid, reduction, grad_loss.to(upcast(weight).dtype))
            run = kernel(_loss_and_grad_kernel, sigma, compiled, recompute=True)
            with autocast_disabled(x.device.type):
                grads = _gradient_pass(
                    run, x, weight, bias, safe, weight_t, smoothing, chunk, params, needs[:3]
                )
        dx = grads.x
        dw = None if grads.w is None else grads.w.to(weight.dtype)
        db = None if grads.b is None else grads.b.to(bias.dtype)
        d_params = split_params(grads.params, params)
        return (dx, dw, db, None, None, None, None, None, None, None, *d_params)


def _differentiable_backward(ctx, grad_loss):
    """The backward as autograd of the plain formula, with graph (the whole (T, V) logits:
    only when a second derivative is asked for)."""
    x, weight, bias, safe, valid, *params = ctx.saved_tensors
    sigma, smoothing, reduction, _chunk, _compiled = ctx.meta
    ctx.grads = None
    with torch.enable_grad():
        losses = _plain_losses(sigma, x, weight, bias, safe, smoothing, params)[0]
        total = _reduce(torch.where(valid, losses, torch.zeros_like(losses)), valid, reduction)
        needs = ctx.needs_input_grad
        dx, dw, db, *d_params = autograd_backward(
            total, (x, weight, bias, *params), (*needs[:3], *needs[10:]), grad_loss
        )
    return (dx, dw, db, None, None, None, None, None, None, None, *d_params)


def supports_fused_output(normalizer: Normalizer) -> bool:
    """Whether σ + cross-entropy of this normaliser can run fused with the output layer
    (softmax of a point-wise σ: MultiMax of any order, V2, softmax with a temperature)."""
    return pointwise_sigma(normalizer) is not None


def linear_sigma_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    normalizer: Normalizer,
    bias: Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
    compiled: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss, nll)`` of ``F.cross_entropy(σ(hidden·Wᵀ + b), target, label_smoothing)``
    without the logits: ``loss`` reduced as ``reduction`` says (``mean`` over the tokens not
    ignored, 0 if there are none), ``nll`` the per-token −log p(target) under softmax(σ(z))
    (shape ``target.shape``, 0 where ignored, no gradient).

    hidden (..., d), weight (V, d), bias (V,) or None, target (...) integers. Gradients reach
    hidden, weight, bias and σ's parameters. ``compiled=None`` follows
    :func:`multimax.compile_policy.use_compiled_kernels` on the number of logits. Under autocast the
    products run in the autocast dtype, as ``linear`` would.
    """
    sigma: PointwiseSigma | None = pointwise_sigma(normalizer)
    if sigma is None:
        raise ValueError(
            f"{type(normalizer).__name__} is not softmax of a point-wise σ: compute the logits "
            "and use multimax.NormalizerLoss"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if hidden.shape[:-1] != target.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and target {tuple(target.shape)} disagree: hidden "
            "must be target's shape plus the feature dimension"
        )
    device = hidden.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if compiled is None:
        compiled = use_compiled_kernels(flat.shape[0] * weight.shape[0])
    params = tuple(sigma.params(normalizer))
    with autocast_disabled(device):
        loss, nll = LinearSigmaCrossEntropy.apply(
            flat,
            weight,
            bias,
            target.reshape(-1),
            sigma,
            float(label_smoothing),
            int(ignore_index),
            reduction,
            chunk_tokens,
            compiled,
            *params,
        )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    return loss, nll.reshape(target.shape)


__all__ = [
    "CHUNK_ENTRIES",
    "MIN_CHUNK_TOKENS",
    "LinearSigmaCrossEntropy",
    "chunk_bounds",
    "linear_sigma_cross_entropy",
    "supports_fused_output",
]

"""Fused σ + row-map attention: one autograd Function that keeps what eager softmax keeps.

For scores R = q·kᵀ, x = R · scale, H = σ(x) + bias (masked entries −∞), and a row map
(softmax; softmax with a sink logit, sigmoid, softpick: :mod:`multimax.row_maps`):

    P = exp(H − m) / s,  O = P · v   (m: row max, s: row sum of exp(H − m))   (forward)
    dP = dO · vᵀ,  δ = rowsum(P ⊙ dP),  dH = P ⊙ (dP − δ)               (backward)
    dR = scale · σ'(x) ⊙ dH,  dq = dR · k,  dk = dRᵀ · q,  dv = Pᵀ · dO
    dθ = Σ dH ⊙ ∂σ/∂θ(x)       (θ: σ's parameters, e.g. MultiMax's a_k, b_k, c_k, d_k)

(the softmax map shown; the others change P and dH, and add their own parameters' sums).
The forward saves q, k, v and two statistics per row (for softmax its log-sum-exp as the
pair (m, log s)), nothing N×M;
forward and backward walk the scores tile by tile (:mod:`multimax.tiling`), the backward
recomputing each tile's σ, σ' and P from them point-wise (bit for bit as in the forward),
so only one tile's scores, P, dP and dR exist at a time. The point-wise work (σ, masking,
softmax; σ', dH and the parameter sums) lives in the small kernel functions below, run
compiled or as plain PyTorch as :mod:`multimax.compile_policy` says (same math); the
matrix products stay in eager BLAS. σ and its derivative come from :mod:`multimax.sigma`.

Under autocast the two matrix products run in the autocast dtype (as autocast would run
them) and the rest in float32. A second derivative (``create_graph=True``) differentiates
the plain formula instead of the hand-written backward. Inputs without any score (a batch,
query or key length of 0) give the empty or zero output with (empty or zero) gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from .compile_policy import kernel, use_compiled_kernels
from .function_grads import autograd_backward, split_params
from .normalizers import Normalizer
from .precision import autocast_cast, autocast_disabled, upcast
from .row_maps import fused_spec
from .tensor_cache import compact_mask
from .tiling import (
    attention_tiles,
    attention_without_scores,
    batch_part,
    causal_keep_of,
    keys_of,
    matmul_into_,
    num_scores,
    row_buffer,
    rows_of,
    scores_of,
    sum_to,
)


def _scores(sigma, x, keep, bias, causal, params):
    """H = σ(x) + bias, −∞ where masked (``keep`` False, or above the diagonal if causal)."""
    h = sigma.forward(x, *params)
    if bias is not None:
        h = h + bias
    if causal:
        h = h.masked_fill(~causal_keep_of(h), float("-inf"))
    if keep is not None:
        h = h.masked_fill(~keep, float("-inf"))
    return h


def _probs_kernel(spec, raw, scale, keep, bias, causal, params, row_params):
    """(P in raw's dtype, the row statistics): H = σ(x) + bias, masked, then the row map
    (:mod:`multimax.row_maps`; for softmax the pair (m, log s), (0, 0) on a row without any
    key, whose P is all zeros). The backward recomputes P from the statistics bit for bit."""
    h = _scores(spec.sigma, upcast(raw) * scale, keep, bias, causal, params)
    p, stats = spec.rows.forward(h, *row_params)
    return p.to(raw.dtype), stats


def _inference_kernel(spec, raw, scale, keep, bias, causal, params, row_params):
    return _probs_kernel(spec, raw, scale, keep, bias, causal, params, row_params)[0]


def _grad_kernel(
    spec, raw, scale, keep, bias, causal, stats, dp, drop, keep_prob, want, params, row_params
):
    """(P for dv or None, dR, dH or None, dθ) of one tile: P recomputed from the row
    statistics, dH from the row map's backward, dR = scale · σ'(x) ⊙ dH; dθ: σ's parameter
    gradients, then the row map's. ``want`` = (P, dH): each returned tile is one more
    temporary, so only when needed (P when v needs a gradient, dH for an additive mask's
    gradient)."""
    want_p, want_dh = want
    x = upcast(raw) * scale
    h = _scores(spec.sigma, x, keep, bias, causal, params)
    p = spec.rows.probs(h, stats, *row_params)
    p_out = None
    if want_p:
        p_out = (p if drop is None else p * drop / keep_prob).to(raw.dtype)
    dp = upcast(dp)
    if drop is not None:
        dp = dp * drop / keep_prob
    dh, d_row = spec.rows.backward(h, p, dp, stats, *row_params)
    dx, dparams = spec.sigma.backward(x, dh, *params)
    return p_out, (dx * scale).to(raw.dtype), (dh if want_dh else None), torch.cat([dparams, d_row])


def _slice_key(sl: slice) -> tuple:
    return (sl.start, sl.stop)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state: Tensor):
    """A block that draws the same random numbers as after ``state`` was taken, leaving the
    global generator as it was: dropout masks are redrawn in the backward, never saved."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


def _dropout_keep(shape: Sequence[int], device: torch.device, dropout_p: float) -> Tensor:
    return torch.rand(shape, device=device) >= dropout_p


class FusedSigmaSoftmaxAttention(torch.autograd.Function):
    """map(σ(q·kᵀ·scale) + bias, masked) · v, tile by tile (map: softmax or another row map);
    the forward keeps q, k, v and two statistics per row, the backward recomputes each tile.
    ``params``: σ's ``n_sigma`` parameters, then the row map's."""

    @staticmethod
    def forward(
        ctx, q, k, v, keep, bias, causal, dropout_p, scale, spec, compiled, n_sigma, *params
    ):
        rng = _rng_state(q.device) if dropout_p > 0 else None
        split = (params[:n_sigma], params[n_sigma:])
        out, lse = _tiled_forward(
            q, k, v, keep, bias, causal, dropout_p, scale, spec, compiled, split, True
        )
        ctx.save_for_backward(q, k, v, keep, bias, lse, *params)
        ctx.meta = (causal, dropout_p, scale, spec, compiled, n_sigma, rng)
        return out

    @staticmethod
    def backward(ctx, d_out):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative will be taken
            return _differentiable_attention_backward(ctx, d_out)
        q, k, v, keep, bias, lse, *params = ctx.saved_tensors
        causal, dropout_p, scale, spec, compiled, n_sigma, rng = ctx.meta
        keep_prob = 1.0 - dropout_p
        d_out = d_out.contiguous()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        want_dh = bias is not None and ctx.needs_input_grad[4]
        batch = d_out.shape[:-2]
        # dk, dv add up over a batch item's tiles: float32 for half precision inputs.
        acc = upcast(q).dtype
        dq = row_buffer(q, (*batch, *q.shape[-2:]), causal, k.shape[-2])
        dk = torch.empty(*batch, *k.shape[-2:], dtype=acc, device=k.device) if need_k else None
        dv = torch.empty(*batch, *v.shape[-2:], dtype=acc, device=v.device) if need_v else None
        started: set[object] = set()  # batch slices whose dk, dv hold a first tile's sum
        d_bias = torch.zeros(bias.shape, dtype=acc, device=q.device) if want_dh else None
        d_params = torch.zeros(sum(p.numel() for p in params), dtype=acc, device=q.device)
        grad = kernel(_grad_kernel, spec, compiled)
        replay = _replayed_rng(q.device, rng) if rng is not None else contextlib.nullcontext()
        with autocast_disabled(q.device.type), replay:
            for tile in attention_tiles(q, k, v, causal):
                q_t, k_t, v_t, d_o = (
                    rows_of(q, tile),
                    keys_of(k, tile),
                    keys_of(v, tile),
                    rows_of(d_out, tile),
                )
                raw = torch.matmul(q_t, k_t.transpose(-2, -1))
                drop = _dropout_keep(raw.shape, raw.device, dropout_p) if rng is not None else None
                dp = torch.matmul(d_o, v_t.transpose(-2, -1))
                p, d_raw, d_h, d_par = grad(
                    raw,
                    scale,
                    scores_of(keep, tile),
                    scores_of(bias, tile),
                    causal,
                    rows_of(lse, tile),
                    dp,
                    drop,
                    keep_prob,
                    (need_v, want_dh),
                    tuple(params[:n_sigma]),
                    tuple(params[n_sigma:]),
                )
                del raw, dp, drop
                # The first tile of a batch slice writes dk, dv over all keys (the keys past
                # its own are zeroed), the later ones add to them.
                first = _slice_key(tile.batch) not in started
                started.add(_slice_key(tile.batch))
                for buffer in (dk, dv) if first else ():
                    if buffer is not None and tile.keys < buffer.shape[-2]:
                        batch_part(buffer, tile.batch)[..., tile.keys :, :].zero_()
                if need_v:
                    matmul_into_(keys_of(dv, tile), p.transpose(-2, -1), d_o, add=not first)
                    del p
                if need_q:
                    matmul_into_(rows_of(dq, tile), d_raw, k_t, add=False)
                if need_k:
                    matmul_into_(keys_of(dk, tile), d_raw.transpose(-2, -1), q_t, add=not first)
                del d_raw
                if want_dh:
                    region = scores_of(d_bias, tile)
                    region.add_(sum_to(d_h, region.shape))
                d_params += d_par

        def grad_of(buffer: Tensor | None, like: Tensor, needed: bool) -> Tensor | None:
            return sum_to(buffer, like.shape).to(like.dtype) if needed else None

        dq, dk, dv = grad_of(dq, q, need_q), grad_of(dk, k, need_k), grad_of(dv, v, need_v)
        d_bias = d_bias.to(bias.dtype) if want_dh else None
        return (
            dq,
            dk,
            dv,
            None,
            d_bias,
            None,
            None,
            None,
            None,
            None,
            None,
            *split_params(d_params, params),
        )


def _differentiable_attention_backward(ctx, d_out):
    """The backward as autograd of the plain formula, with graph, for a second derivative:
    the hand-written backward is exact for first derivatives only (it treats the saved
    statistics as constants). Costs what the reference path costs (the whole N×M weights
    and dropout mask, redrawn); only runs when asked."""
    q, k, v, keep, bias, _lse, *params = ctx.saved_tensors
    causal, dropout_p, scale, spec, _compiled, n_sigma, rng = ctx.meta
    with torch.enable_grad():
        raw = torch.matmul(q, k.transpose(-2, -1))
        sigma_params, row_params = tuple(params[:n_sigma]), tuple(params[n_sigma:])
        p = _probs_kernel(spec, raw, scale, keep, bias, causal, sigma_params, row_params)[0]
        if rng is not None:
            drop = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            with _replayed_rng(q.device, rng):
                for tile in attention_tiles(q, k, v, causal):
                    part = rows_of(drop, tile)[..., : tile.keys]
                    part.copy_(_dropout_keep(part.shape, part.device, dropout_p))
            p = p * drop / (1.0 - dropout_p)
        out = torch.matmul(p.to(v.dtype), v)
        needed = ctx.needs_input_grad
        dq, dk, dv, d_bias, *d_params = autograd_backward(
            out, (q, k, v, bias, *params), (*needed[:3], needed[4], *needed[11:]), d_out
        )
    return (dq, dk, dv, None, d_bias, None, None, None, None, None, None, *d_params)


def _tiled_forward(q, k, v, keep, bias, causal, dropout_p, scale, spec, compiled, params, lse):
    """(output, the row statistics (for softmax the log-sum-exp as (m, log s)) or None): the
    forward, tile by tile; ``params`` = (σ's, the row map's); the statistics only when
    ``lse`` (training: the backward recomputes P from them)."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = row_buffer(v, (*batch, q.shape[-2], v.shape[-1]), causal, k.shape[-2])
    stats = None
    if lse:
        stats = torch.zeros(*batch, q.shape[-2], 2, dtype=upcast(q).dtype, device=q.device)
    probs = kernel(_probs_kernel if lse else _inference_kernel, spec, compiled)
    for tile in attention_tiles(q, k, v, causal):
        raw = torch.matmul(rows_of(q, tile), keys_of(k, tile).transpose(-2, -1))
        p = probs(raw, scale, scores_of(keep, tile), scores_of(bias, tile), causal, *params)
        del raw
        if lse:
            p, tile_lse = p
            rows_of(stats, tile).copy_(tile_lse)
        if dropout_p > 0:  # the backward redraws these masks in this order (same generator)
            p = p * _dropout_keep(p.shape, p.device, dropout_p) / (1.0 - dropout_p)
        matmul_into_(rows_of(out, tile), p.to(v.dtype), keys_of(v, tile), add=False)
        del p
    return out, stats


def _inference(q, k, v, keep, bias, causal, dropout_p, scale, spec, compiled, params) -> Tensor:
    """The forward alone, tile by tile, saving nothing."""
    return _tiled_forward(
        q, k, v, keep, bias, causal, dropout_p, scale, spec, compiled, params, False
    )[0]


def fused_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: Normalizer,
    keep: Tensor | None = None,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float = 1.0,
    compiled: bool | None = None,
    is_causal: bool = False,
) -> Tensor:
    """Attention through the tiled Function (training) or the tiled forward (no grad).

    ``keep``: bool, True = keep; ``bias``: float, added after σ; ``is_causal``: query i sees
    keys j <= i + M − N (computed per tile, never as a mask). ``compiled=None`` follows
    :func:`multimax.compile_policy.use_compiled_kernels`. Under autocast, q, k and v are cast as autocast casts a
    matrix product's inputs and the rest runs outside autocast.
    """
    spec = fused_spec(normalizer)
    if spec is None:
        raise ValueError(f"{type(normalizer).__name__} has no fused attention kernel")
    (q, k, v), autocast_on = autocast_cast(q, k, v)
    if autocast_on:
        with autocast_disabled(q.device.type):
            return fused_attention(
                q, k, v, normalizer, keep, bias, dropout_p, scale, compiled, is_causal
            )
    params = tuple(spec.sigma.params(normalizer))
    row_params = tuple(spec.rows.params(normalizer, q))
    scores = num_scores(q, k)
    if scores == 0:
        return attention_without_scores(q, k, v, spec.sigma, params, scale, row_params)
    if compiled is None:
        compiled = use_compiled_kernels(scores)
    rank = max(q.dim(), k.dim())
    keep = compact_mask(keep, rank)
    bias = compact_mask(None if bias is None else upcast(bias), rank)
    # Row and key views of contiguous inputs fold into batched GEMMs without copies.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias, *params, *row_params)
    )
    if not needs_grad:
        split = (params, row_params)
        return _inference(q, k, v, keep, bias, is_causal, dropout_p, scale, spec, compiled, split)
    return FusedSigmaSoftmaxAttention.apply(
        q,
        k,
        v,
        keep,
        bias,
        is_causal,
        dropout_p,
        scale,
        spec,
        compiled,
        len(params),
        *params,
        *row_params,
    )


__all__ = ["FusedSigmaSoftmaxAttention", "fused_attention"]

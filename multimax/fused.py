"""Fused σ + softmax attention: one autograd Function that keeps what eager softmax keeps.

For scores R = q·kᵀ, x = R · scale, H = σ(x) + bias (masked entries −∞):

    P = exp(H − m) / s,  O = P · v   (m: row max, s: row sum of exp(H − m))   (forward)
    dP = dO · vᵀ,  δ = rowsum(P ⊙ dP),  dH = P ⊙ (dP − δ)               (backward)
    dR = scale · σ'(x) ⊙ dH,  dq = dR · k,  dk = dRᵀ · q,  dv = Pᵀ · dO
    dθ = Σ dH ⊙ ∂σ/∂θ(x)       (θ: σ's parameters, e.g. MultiMax's a_k, b_k, c_k, d_k)

The forward saves R (one N×M tensor, as eager attention saves its P) and the rows' m and s;
the backward recomputes σ, σ' and P from them point-wise (bit for bit as in the forward).
Forward and backward walk the batch in slices (``SLICE_SCORES`` entries each), so besides R
only one slice's P, dP and dR exist at a time: the peak is below eager softmax attention's
(P, dP and dS at full size). The point-wise work (σ, masking,
softmax; σ', dH and the parameter sums) lives in small kernel functions; they run through
``torch.compile`` (one fused loop each, dynamic shapes) when :func:`use_compiled_kernels`
says so, else as plain PyTorch (same math, slower). Matrix products stay in eager BLAS.

A normaliser is fused when its mapping is softmax and its transform is point-wise with a
registered :class:`PointwiseSigma` (MultiMax, softmax with a fixed or learned temperature);
:func:`register_pointwise_sigma` adds more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .modulation import MultiMax
from .normalizers import Normalizer, Softmax

# --- point-wise σ specifications ---------------------------------------------------------


@dataclass(frozen=True)
class PointwiseSigma:
    """σ as pure tensor functions of the scores x and its parameter tensors.

    ``forward(x, *params) -> σ(x)``; ``backward(x, dh, *params) -> (dx, dparams)`` with
    ``dx = dh ⊙ σ'(x)`` and ``dparams`` a 1-D tensor of the parameter gradients, flattened in
    the order of ``params`` (summed over every entry of ``dh``). ``key`` names the kernel for
    caching compiled versions.
    """

    key: str
    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor, Tensor]]
    params: Callable[[Normalizer], tuple[Tensor, ...]]


def _multimax_sigma(order: int) -> PointwiseSigma:
    def forward(x: Tensor, low_t: Tensor, high_t: Tensor, low_c: Tensor, high_c: Tensor):
        out = x
        for k in range(order):
            low = torch.relu(low_t[k] - x)
            high = torch.relu(x - high_t[k])
            if k > 0:
                low, high = low.pow(k + 1), high.pow(k + 1)
            out = out + low_c[k] * low + high_c[k] * high
        return out

    def backward(x: Tensor, dh: Tensor, low_t: Tensor, high_t: Tensor, lc: Tensor, hc: Tensor):
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
            slope = slope - lc[k] * d_low + hc[k] * d_high
            g_lt.append(lc[k] * (dh * d_low).sum())
            g_ht.append(-hc[k] * (dh * d_high).sum())
            g_lc.append((dh * p_low).sum())
            g_hc.append((dh * p_high).sum())
        return dh * slope, torch.stack(g_lt + g_ht + g_lc + g_hc)

    def params(n: Normalizer) -> tuple[Tensor, ...]:
        assert isinstance(n, MultiMax)
        return n.sigma_parameters()

    return PointwiseSigma(f"multimax{order}", forward, backward, params)


def _temperature_forward(x: Tensor, log_t: Tensor) -> Tensor:
    return x / log_t.exp()


def _temperature_backward(x: Tensor, dh: Tensor, log_t: Tensor) -> tuple[Tensor, Tensor]:
    inv_t = (-log_t).exp()
    dx = dh * inv_t
    return dx, (-(dx * x).sum()).reshape(1)


TEMPERATURE_SIGMA = PointwiseSigma(
    "temperature",
    _temperature_forward,
    _temperature_backward,
    lambda n: (n.log_temperature,),  # type: ignore[attr-defined]
)
IDENTITY_SIGMA = PointwiseSigma(
    "identity", lambda x: x, lambda x, dh: (dh, dh.new_zeros(0)), lambda n: ()
)

_SIGMA_FACTORIES: dict[type, Callable[[Normalizer], PointwiseSigma]] = {}


def register_pointwise_sigma(cls: type, factory: Callable[[Normalizer], PointwiseSigma]) -> None:
    """Let normalisers of class ``cls`` (mapping softmax) use the fused paths."""
    _SIGMA_FACTORIES[cls] = factory


_MULTIMAX_SIGMAS = {order: _multimax_sigma(order) for order in (1, 2)}
register_pointwise_sigma(MultiMax, lambda n: _MULTIMAX_SIGMAS[n.order])  # type: ignore[attr-defined]
register_pointwise_sigma(
    Softmax,
    lambda n: IDENTITY_SIGMA if n.is_plain_softmax else TEMPERATURE_SIGMA,
)


def pointwise_sigma(normalizer: Normalizer) -> PointwiseSigma | None:
    """The fused-kernel spec for ``normalizer``, or None when it has to take the reference."""
    if normalizer.mapping != "softmax":
        return None
    factory = _SIGMA_FACTORIES.get(type(normalizer))
    return None if factory is None else factory(normalizer)


# --- point-wise kernels ------------------------------------------------------------------
# Pure functions of tensors (plus the σ spec): compiled as a whole by torch.compile.


def upcast(x: Tensor) -> Tensor:
    """Half precision computes in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scores(sigma, raw, scale, keep, bias, params):
    h = sigma.forward(upcast(raw) * scale, *params)
    if bias is not None:
        h = h + bias
    if keep is not None:
        h = h.masked_fill(~keep, float("-inf"))
    return h


def _probs_kernel(sigma, raw, scale, keep, bias, params):
    """P = softmax(H) (zeros for masked entries and empty rows), the row max m and the row
    sum s of exp(H − m) (1 on empty rows): P = exp(H − m) / s is recomputed bit for bit."""
    h = _scores(sigma, raw, scale, keep, bias, params)
    m = h.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(h - m)
    s = e.sum(-1, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return e / s, m, s


def _inference_kernel(sigma, raw, scale, keep, bias, params):
    return _probs_kernel(sigma, raw, scale, keep, bias, params)[0]


def _grad_kernel(sigma, raw, scale, keep, bias, m, s, dp, drop, keep_prob, want, params):
    """(P for dv or None, dR, dH or None, dθ): dR = scale · σ'(x) ⊙ dH. ``want`` = (P, dH):
    each returned N×M tensor is one more at the backward's peak, so only when needed
    (P when v needs a gradient, dH for an additive mask's gradient)."""
    want_p, want_dh = want
    x = upcast(raw) * scale
    h = sigma.forward(x, *params)
    if bias is not None:
        h = h + bias
    if keep is not None:
        h = h.masked_fill(~keep, float("-inf"))
    p = torch.exp(h - m) / s
    p_out = None
    if want_p:
        p_out = p if drop is None else p * drop / keep_prob
    if drop is not None:
        dp = dp * drop / keep_prob
    dp = upcast(dp)
    # δ = rowsum(P ⊙ dP), as softmax's own backward has it (rowsum(dO ⊙ O) is equal in exact
    # arithmetic but cancels badly when σ steepens the scores).
    dh = p * (dp - (p * dp).sum(-1, keepdim=True))
    dx, dparams = sigma.backward(x, dh, *params)
    return p_out, dx * scale, (dh if want_dh else None), dparams


_COMPILED: dict[tuple[str, str], Callable] = {}

# Score tensors at least this large use compiled kernels under the "auto" policy: below it
# the (one-off, cached) compile costs more than it saves.
COMPILE_MIN_SCORES = 1 << 19


def _env_compile_policy() -> str:
    value = os.environ.get("MULTIMAX_COMPILE", "auto").strip().lower()
    if value in ("1", "true", "yes", "on", "always"):
        return "always"
    if value in ("0", "false", "no", "off", "never"):
        return "never"
    return "auto"


_compile_policy = _env_compile_policy()


def set_compile_policy(policy: str) -> str:
    """``"auto"`` (compile for score tensors ≥ COMPILE_MIN_SCORES), ``"always"`` or
    ``"never"``; returns the previous policy. The env var ``MULTIMAX_COMPILE`` sets the
    default (1/0/auto)."""
    global _compile_policy
    if policy not in ("auto", "always", "never"):
        raise ValueError(f"compile policy must be auto, always or never, got {policy!r}")
    previous, _compile_policy = _compile_policy, policy
    return previous


def compile_available() -> bool:
    """torch.compile can build kernels here (and we are not already inside a compile)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    return hasattr(torch, "compile")


def use_compiled_kernels(num_scores: int) -> bool:
    """Whether kernels for a score tensor of ``num_scores`` entries run compiled."""
    if _compile_policy == "never" or not compile_available():
        return False
    return _compile_policy == "always" or num_scores >= COMPILE_MIN_SCORES


def kernel(fn: Callable, sigma: PointwiseSigma, compiled: bool) -> Callable:
    """``fn(sigma, *args)`` as a function of ``args``: torch.compile'd (dynamic shapes, one
    cached build per kernel and σ) when ``compiled``, else plain PyTorch."""
    if not compiled:
        return lambda *args: fn(sigma, *args)
    key = (f"{fn.__module__}.{fn.__qualname__}", sigma.key)
    if key not in _COMPILED:

        def entry(*args):
            return fn(sigma, *args)

        # A code object of its own per (kernel, σ): dynamo keeps one cache (and one recompile
        # limit) per code object, so kernels must not share a wrapper's.
        entry.__code__ = entry.__code__.replace(co_name=f"{fn.__name__}_{sigma.key}")
        _COMPILED[key] = torch.compile(entry, dynamic=True, fullgraph=True)
    return _COMPILED[key]


# --- the autograd Function ---------------------------------------------------------------


def _sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


# Batch slices whose score block has about this many entries: the N×M temporaries (P, dP,
# dR) then exist one slice at a time, and only the saved scores R exist at full size.
SLICE_SCORES = 1 << 20


def _batch_slices(q: Tensor, k: Tensor, v: Tensor, whole: bool = False) -> list[slice]:
    """Slices of the batch; one covering everything when q, k, v do not share a 4-D batch."""
    same = q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0]
    batch = q.shape[0] if same else 1
    per_item = q[0].numel() // q.shape[-1] * k.shape[-2] if same else 0
    if whole or batch <= 1 or per_item == 0:
        return [slice(None)]
    step = max(1, SLICE_SCORES // per_item)
    return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]


def _part(t: Tensor | None, sl: slice) -> Tensor | None:
    """The batch slice of a (possibly broadcast) 4-D mask / bias / saved tensor."""
    if t is None or sl == slice(None) or t.dim() < 4 or t.shape[0] == 1:
        return t
    return t[sl]


class FusedSigmaSoftmaxAttention(torch.autograd.Function):
    """softmax(σ(q·kᵀ·scale) + bias, masked) · v with a hand-written, memory-lean backward."""

    @staticmethod
    def forward(ctx, q, k, v, keep, bias, dropout_p, scale, sigma, compiled, *params):
        raw = torch.matmul(q, k.transpose(-2, -1))
        slices = _batch_slices(q, k, v)
        outs, ms, ss, drops = [], [], [], []
        probs = kernel(_probs_kernel, sigma, compiled)
        for sl in slices:
            p, m, s = probs(raw[sl], scale, _part(keep, sl), _part(bias, sl), params)
            if dropout_p > 0:
                drop = torch.rand(p.shape, device=p.device) >= dropout_p
                p = p * drop / (1.0 - dropout_p)
                drops.append(drop)
            outs.append(torch.matmul(p.to(v.dtype), v[sl]))
            ms.append(m)
            ss.append(s)
            del p
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        m, s = torch.cat(ms), torch.cat(ss)
        drop = torch.cat(drops) if drops else None
        ctx.save_for_backward(q, k, v, keep, bias, raw, m, s, drop, *params)
        ctx.meta = (dropout_p, scale, sigma, compiled)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, keep, bias, raw, m, s, drop, *params = ctx.saved_tensors
        dropout_p, scale, sigma, compiled = ctx.meta
        keep_prob = 1.0 - dropout_p
        d_out = d_out.contiguous()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        want_dh = bias is not None and ctx.needs_input_grad[4]
        dqs, dks, dvs = [], [], []
        d_params = d_h = None
        grad = kernel(_grad_kernel, sigma, compiled)
        # One batch slice at a time (the whole batch when a bias gradient is wanted): besides
        # R, only one slice's dP, P and dR are alive.
        for sl in _batch_slices(q, k, v, whole=want_dh):
            d_o = d_out[sl]
            dp = torch.matmul(d_o, v[sl].transpose(-2, -1))
            p, d_raw, d_h, d_par = grad(
                raw[sl],
                scale,
                _part(keep, sl),
                _part(bias, sl),
                m[sl],
                s[sl],
                dp,
                _part(drop, sl),
                keep_prob,
                (need_v, want_dh),
                params,
            )
            del dp
            if need_v:
                dvs.append(torch.matmul(p.to(d_o.dtype).transpose(-2, -1), d_o))
                del p
            d_raw = d_raw.to(q.dtype)
            if need_q:
                dqs.append(torch.matmul(d_raw, k[sl]))
            if need_k:
                dks.append(torch.matmul(d_raw.transpose(-2, -1), q[sl]))
            d_params = d_par if d_params is None else d_params + d_par

        def join(parts: list[Tensor], like: Tensor) -> Tensor | None:
            if not parts:
                return None
            return _sum_to(parts[0] if len(parts) == 1 else torch.cat(parts), like.shape)

        dq, dk, dv = join(dqs, q), join(dks, k), join(dvs, v)
        d_bias = _sum_to(d_h, bias.shape).to(bias.dtype) if want_dh else None
        grads, offset = [], 0
        for param in params:
            n = param.numel()
            grads.append(d_params[offset : offset + n].reshape(param.shape).to(param.dtype))
            offset += n
        return (dq, dk, dv, None, d_bias, None, None, None, None, *grads)


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
) -> Tensor:
    """Attention through the fused Function (training) or the inference kernel (no grad).

    ``keep``: bool, True = keep (causal already folded in); ``bias``: float, added after σ.
    ``compiled=None`` follows :func:`use_compiled_kernels`.
    """
    sigma = pointwise_sigma(normalizer)
    if sigma is None:
        raise ValueError(f"{type(normalizer).__name__} has no point-wise σ kernel")
    params = tuple(sigma.params(normalizer))
    num_scores = q.shape[-2] * k.shape[-2] * max(1, q[..., 0, 0].numel())
    if compiled is None:
        compiled = use_compiled_kernels(num_scores)
    if bias is not None:
        bias = upcast(bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias, *params)
    )
    if not needs_grad:
        outs = []
        infer = kernel(_inference_kernel, sigma, compiled)
        for sl in _batch_slices(q, k, v):
            raw = torch.matmul(q[sl], k[sl].transpose(-2, -1))
            p = infer(raw, scale, _part(keep, sl), _part(bias, sl), params)
            del raw
            if dropout_p > 0:
                p = torch.nn.functional.dropout(p, dropout_p, training=True)
            outs.append(torch.matmul(p.to(v.dtype), v[sl]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    return FusedSigmaSoftmaxAttention.apply(
        q, k, v, keep, bias, dropout_p, scale, sigma, compiled, *params
    )


__all__ = [
    "COMPILE_MIN_SCORES",
    "FusedSigmaSoftmaxAttention",
    "PointwiseSigma",
    "compile_available",
    "fused_attention",
    "pointwise_sigma",
    "register_pointwise_sigma",
    "kernel",
    "set_compile_policy",
    "upcast",
    "use_compiled_kernels",
]

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
registered :class:`PointwiseSigma` (MultiMax of any order, MultiMax V2, softmax with a fixed
or learned temperature); :func:`register_pointwise_sigma` adds more.

Compiled kernels build one graph per input pattern (which arguments are None, which
dimensions are 1, dtypes), each with dynamic sizes, so new lengths and batch sizes reuse it;
a kernel that does not compile runs eagerly, with one warning. Under autocast the two
matrix products run in the autocast dtype (as autocast would run them) and the rest in
float32. A second derivative (``create_graph=True``) differentiates the plain formula
instead of the hand-written backward. Inputs without any score (a batch, query or key
length of 0) give the empty or zero output with (empty or zero) gradients.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .modulation import MultiMax, MultiMaxV2
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


@functools.cache
def multimax_sigma(order: int) -> PointwiseSigma:
    """MultiMax's σ of order K (BRIEF §1): built once per order."""

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


def _affine_then(inner: PointwiseSigma, key: str) -> PointwiseSigma:
    """σ(x) = inner(t·x + b) with scalars t, b ahead of inner's parameters (MultiMax V2)."""

    def forward(x: Tensor, scale: Tensor, shift: Tensor, *params: Tensor) -> Tensor:
        return inner.forward(scale[0] * x + shift[0], *params)

    def backward(x: Tensor, dh: Tensor, scale: Tensor, shift: Tensor, *params: Tensor):
        d_inner, d_params = inner.backward(scale[0] * x + shift[0], dh, *params)
        d_scale = (d_inner * x).sum().reshape(1)
        d_shift = d_inner.sum().reshape(1)
        return d_inner * scale[0], torch.cat([d_scale, d_shift, d_params])

    def params(n: Normalizer) -> tuple[Tensor, ...]:
        assert isinstance(n, MultiMaxV2)
        return (*n.affine_parameters(), *n.sigma_parameters())

    return PointwiseSigma(key, forward, backward, params)


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


MULTIMAX_V2_SIGMA = _affine_then(multimax_sigma(1), "multimax_v2")
register_pointwise_sigma(MultiMax, lambda n: multimax_sigma(n.order))  # type: ignore[attr-defined]
register_pointwise_sigma(MultiMaxV2, lambda n: MULTIMAX_V2_SIGMA)
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


def causal_keep_of(h: Tensor) -> Tensor:
    """Bool (N, M) for a score block h (..., N, M) whose rows are the last N queries before
    keys 0..M-1: query i sees keys j <= i + M − N (aligned to the end, as the contract has
    it). Built from h's own sizes, so a compiled kernel needs no offset argument."""
    n, m = h.shape[-2], h.shape[-1]
    rows = torch.arange(n, device=h.device).unsqueeze(-1)
    return torch.arange(m, device=h.device) <= rows + (m - n)


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


def _probs_kernel(sigma, raw, scale, keep, bias, causal, params):
    """(P in raw's dtype, ℓ): P = softmax of each row of H, and its log-sum-exp as the pair
    ℓ = (m, log s) (row max m, s = Σ exp(H − m); (0, 0) on a row without any key, whose P
    is all zeros). P = exp((H − m) − log s) is recomputed from ℓ bit for bit in the backward;
    the pair, not m + log s, because rounding that sum would scale the whole row of P by a
    relative error of about ulp(m), ten times the softmax's own."""
    h = _scores(sigma, upcast(raw) * scale, keep, bias, causal, params)
    m = h.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    s = torch.exp(h - m).sum(-1, keepdim=True)
    log_s = torch.log(torch.where(s > 0, s, torch.ones_like(s)))
    return torch.exp((h - m) - log_s).to(raw.dtype), torch.cat([m, log_s], dim=-1)


def _inference_kernel(sigma, raw, scale, keep, bias, causal, params):
    return _probs_kernel(sigma, raw, scale, keep, bias, causal, params)[0]


def _grad_kernel(sigma, raw, scale, keep, bias, causal, lse, dp, drop, keep_prob, want, params):
    """(P for dv or None, dR, dH or None, dθ) of one tile: P = exp(H − ℓ) recomputed,
    dH = P ⊙ (dP − rowsum(P ⊙ dP)), dR = scale · σ'(x) ⊙ dH. ``want`` = (P, dH): each
    returned tile is one more temporary, so only when needed (P when v needs a gradient,
    dH for an additive mask's gradient)."""
    want_p, want_dh = want
    x = upcast(raw) * scale
    p = torch.exp((_scores(sigma, x, keep, bias, causal, params) - lse[..., :1]) - lse[..., 1:])
    p_out = None
    if want_p:
        p_out = (p if drop is None else p * drop / keep_prob).to(raw.dtype)
    dp = upcast(dp)
    if drop is not None:
        dp = dp * drop / keep_prob
    # δ = rowsum(P ⊙ dP), as softmax's own backward has it (rowsum(dO ⊙ O) is equal in exact
    # arithmetic but cancels badly when σ steepens the scores).
    dh = p * (dp - (p * dp).sum(-1, keepdim=True))
    dx, dparams = sigma.backward(x, dh, *params)
    return p_out, (dx * scale).to(raw.dtype), (dh if want_dh else None), dparams


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


def compile_policy() -> str:
    """The current policy: ``"auto"``, ``"always"`` or ``"never"``."""
    return _compile_policy


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


def _compile_pattern(arg) -> object:
    """What a compiled graph specialises on, besides sizes: for a tensor its dtype, device,
    contiguity and which dimensions are 1 (dynamo specialises sizes 0 and 1); Python bools and
    None by value; a function by its code and the patterns of what it captures; a BlockMask by
    its parts; numbers and anything else by type (numbers are symbolic under dynamic shapes)."""
    if isinstance(arg, Tensor):
        ones = tuple(size == 1 for size in arg.shape)
        return (arg.dtype, arg.device.type, arg.is_contiguous(), ones)
    if isinstance(arg, (tuple, list)):
        return tuple(_compile_pattern(a) for a in arg)
    if arg is None or isinstance(arg, bool):
        return arg
    code = getattr(arg, "__code__", None)
    if code is not None:
        cells = getattr(arg, "__closure__", None) or ()
        return (id(code), tuple(_compile_pattern(cell.cell_contents) for cell in cells))
    as_tuple = getattr(arg, "as_tuple", None)
    if callable(as_tuple):
        return (type(arg).__name__, _compile_pattern(as_tuple()))
    return type(arg)


def _detached(arg):
    if isinstance(arg, Tensor):
        return arg.detach()
    if isinstance(arg, tuple):
        return tuple(_detached(a) for a in arg)
    return arg


_warned_kernels: set[str] = set()


class CompiledKernel:
    """``fn(sigma, *args)`` through ``torch.compile``: one graph per input pattern
    (:func:`_compile_pattern`), each with dynamic sizes and a code object (hence a dynamo cache
    and recompile budget) of its own, so one kernel shared by every layer serves every mask
    kind and length without recompiling. A pattern whose graph fails to build or run (a
    graph break, the recompile limit, a compiler error) runs eagerly from then on, with one
    warning per kernel; an error that the eager run raises too is the inputs' and is raised."""

    def __init__(self, fn: Callable, sigma: PointwiseSigma, recompute: bool = False) -> None:
        self.fn = fn
        self.sigma = sigma
        self.recompute = recompute
        self.name = f"{fn.__name__}_{sigma.key}"
        self.graphs: dict[object, Callable] = {}
        self.eager_patterns: set[object] = set()

    def eager(self, *args):
        return self.fn(self.sigma, *args)

    def _build(self) -> Callable:
        fn, sigma = self.fn, self.sigma

        def entry(*args):
            return fn(sigma, *args)

        entry.__code__ = entry.__code__.replace(co_name=f"{self.name}_{len(self.graphs)}")
        options = _recompute_options() if self.recompute else None
        return torch.compile(entry, dynamic=True, fullgraph=True, options=options)

    def __call__(self, *args):
        if not torch.is_grad_enabled():
            # A view makes dynamo guard on its base as well; without autograd an alias does.
            args = _detached(args)
        pattern = _compile_pattern(args)
        if pattern in self.eager_patterns:
            return self.eager(*args)
        graph = self.graphs.get(pattern)
        if graph is None:
            graph = self.graphs[pattern] = self._build()
        try:
            # Equal sizes (N == M, B == H) get symbols of their own: no guard ties them.
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return graph(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure; eager decides below
            result = self.eager(*args)
            self.eager_patterns.add(pattern)
            if self.name not in _warned_kernels:
                _warned_kernels.add(self.name)
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
                warnings.warn(
                    f"multimax: torch.compile could not build kernel {self.name} ({reason}); "
                    "it runs eagerly for these inputs (same results, slower). "
                    "MULTIMAX_COMPILE=0 turns compiled kernels off.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return result


_COMPILED: dict[tuple[str, str], CompiledKernel] = {}

# Inductor's store-or-recompute thresholds, raised: σ(z) is recomputed in each loop over a
# row instead of stored as a whole chunk (one chunk-sized buffer less, the same time for the
# output layer's kernel; the attention kernels run faster with the default).
_RECOMPUTE = {
    "realize_reads_threshold": 64,
    "realize_opcount_threshold": 1000,
    "realize_cpu_opcount_threshold": 1000,
}


def _recompute_options() -> dict[str, int]:
    from torch._inductor import config

    return {name: value for name, value in _RECOMPUTE.items() if hasattr(config, name)}


def kernel(fn: Callable, sigma: PointwiseSigma, compiled: bool, recompute: bool = False):
    """``fn(sigma, *args)`` as a function of ``args``: a :class:`CompiledKernel` (one per
    kernel and σ, cached) when ``compiled``, else plain PyTorch. ``recompute``: compile it to
    recompute point-wise values rather than store them (less memory, more arithmetic)."""
    if not compiled:
        return functools.partial(fn, sigma)
    key = (f"{fn.__module__}.{fn.__qualname__}", sigma.key)
    if key not in _COMPILED:
        _COMPILED[key] = CompiledKernel(fn, sigma, recompute)
    return _COMPILED[key]


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A block with autocast off on ``device_type`` (nothing where it has no autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_cast(*tensors: Tensor) -> tuple[tuple[Tensor, ...], bool]:
    """(tensors, True) cast as autocast casts a matrix product's inputs (floating point but
    not float64, to the autocast dtype) when autocast is on for their device; else
    (tensors, False) unchanged."""
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors, False
    dtype = torch.get_autocast_dtype(device)
    eligible = lambda t: t.is_floating_point() and t.dtype != torch.float64  # noqa: E731
    return tuple(t.to(dtype) if eligible(t) else t for t in tensors), True


def num_scores(q: Tensor, k: Tensor) -> int:
    """Entries of the (B, H, N, M) score tensor of q (..., N, D) and k (..., M, D)."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]).numel()
    return batch * q.shape[-2] * k.shape[-2]


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def compact_mask(t: Tensor | None, rank: int) -> Tensor | None:
    """A broadcastable mask or bias as a ``rank``-D tensor whose broadcast (expanded,
    stride-0) dimensions have size 1, with row-major strides on every dimension (size-1 ones
    too): the same values after broadcasting, and one layout per broadcast pattern, which is
    what the compiled kernels guard on."""
    if t is None:
        return None
    while t.dim() < rank:
        t = t.unsqueeze(0)
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for size, stride in zip(t.shape, t.stride(), strict=True)
    )
    t = t[index]
    if t.stride() != _contiguous_strides(t.shape):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


class TensorCache:
    """A small least-recently-used cache of values derived from tensors (a block mask from a
    mask, ...), keyed on those tensors' identity and version: a tensor changed in place
    since misses, and an entry goes when one of its tensors is freed (weak references, so
    the cache keeps no mask alive). Bypassed while torch.compile traces."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, tuple[tuple, object]] = OrderedDict()

    def get(self, tensors: Sequence[Tensor | None], extra: tuple, build: Callable[[], object]):
        if torch.compiler.is_compiling():
            return build()
        present = [t for t in tensors if t is not None]
        key = (tuple(None if t is None else (id(t), t._version) for t in tensors), extra)
        entry = self.entries.get(key)
        if entry is not None and all(r() is t for r, t in zip(entry[0], present, strict=True)):
            self.entries.move_to_end(key)
            return entry[1]
        value = build()
        entries = self.entries

        def forget(_ref, key=key) -> None:
            entries.pop(key, None)

        self.entries[key] = (tuple(weakref.ref(t, forget) for t in present), value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


# Score tiles of about this many entries: every N×M temporary (scores, P, dP, dR) exists one
# tile at a time, and nothing N×M is kept from the forward for the backward.
SLICE_SCORES = 1 << 19
# Query rows per tile under a causal mask: a tile sees only the keys up to its last row, so
# smaller tiles skip more of the masked triangle (and cost more calls).
CAUSAL_TILE_ROWS = 128
# Fewest query rows per tile, whatever SLICE_SCORES says: a GEMM of fewer rows reloads the
# keys for every few rows and runs well below the BLAS's speed (long sequences).
MIN_TILE_ROWS = 64


@dataclass(frozen=True)
class Tile:
    """Rows ``rows`` of batch items ``batch`` (dimension 0 of a 4-D batch) against keys
    ``0 .. keys-1`` (all of them unless causal)."""

    batch: slice
    rows: slice
    keys: int


def _even_bounds(total: int, step: int) -> list[int]:
    """Boundaries splitting ``total`` into parts of about ``step`` (at most ``step`` unless
    that would leave a part of one): every part has at least 2 when ``total`` >= 2, since a
    size of 1 is a different graph to a compiled kernel (dynamo specialises it)."""
    count = max(1, min(-(-total // max(step, 1)), total // 2))
    return [round(i * total / count) for i in range(count + 1)]


def attention_tiles(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> list[Tile]:
    """Tiles covering every (batch item, query row) that has a key, each of about
    ``SLICE_SCORES`` scores (at least ``MIN_TILE_ROWS`` rows): whole rows (every key a row sees is in its tile, so a row's
    softmax needs no second pass), rows split evenly, batch items grouped while they fit.
    Under a causal mask a tile stops at the key of its last row (keys past it are skipped) and
    rows with no key at all (more queries than keys) are in no tile. q, k, v that do not
    share a 4-D batch are tiled over rows only."""
    n, m = q.shape[-2], k.shape[-2]
    batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    sliceable = q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0]
    items = batch_shape[0] if sliceable else 1
    per_row = math.prod(batch_shape[1:] if sliceable else batch_shape) * m  # one batch item
    rows = max(1, MIN_TILE_ROWS, SLICE_SCORES // max(per_row, 1))
    if causal:
        rows = min(rows, CAUSAL_TILE_ROWS)
    row_bounds = _even_bounds(n, rows)
    tile_rows = max(b - a for a, b in zip(row_bounds, row_bounds[1:]))
    batch_bounds = _even_bounds(items, SLICE_SCORES // max(per_row * tile_rows, 1))
    tiles = []
    for b0, b1 in zip(batch_bounds, batch_bounds[1:]):
        batch = slice(None) if not sliceable or (b0, b1) == (0, items) else slice(b0, b1)
        for i0, i1 in zip(row_bounds, row_bounds[1:]):
            keys = min(m, i1 + m - n) if causal else m
            if keys > 0:
                tiles.append(Tile(batch, slice(i0, i1), keys))
    return tiles


def _rows(t: Tensor, tile: Tile) -> Tensor:
    """The tile's query rows of a (..., N, ·) tensor (a view)."""
    return _part(t, tile.batch)[..., tile.rows, :]


def _keys(t: Tensor, tile: Tile) -> Tensor:
    """The tile's keys of a (..., M, ·) tensor (a view)."""
    return _part(t, tile.batch)[..., : tile.keys, :]


def _scores_part(t: Tensor | None, tile: Tile) -> Tensor | None:
    """The tile's part of a mask / bias broadcastable to (B, H, N, M) (a view)."""
    if t is None:
        return None
    t = _part(t, tile.batch)
    if t.shape[-2] != 1:
        t = t[..., tile.rows, :]
    if t.shape[-1] != 1:
        t = t[..., : tile.keys]
    return t


def _sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _part(t: Tensor | None, sl: slice) -> Tensor | None:
    """The batch slice of a (possibly broadcast) 4-D mask / bias / input."""
    if t is None or sl == slice(None) or t.dim() < 4 or t.shape[0] == 1:
        return t
    return t[sl]


def _matmul_into_(acc: Tensor, a: Tensor, b: Tensor, add: bool) -> None:
    """acc = a @ b, or acc += a @ b when ``add``, in place: one batched GEMM writing into acc
    (a view) when the batch folds into one dimension and the dtypes agree, so no temporary
    of acc's size; else through a product (summed over broadcast batch dimensions)."""
    if acc.dtype == a.dtype == b.dtype and a.shape[:-2] == b.shape[:-2] == acc.shape[:-2]:
        try:
            flat = acc.view(-1, *acc.shape[-2:])
        except RuntimeError:  # the batch does not fold without a copy
            pass
        else:
            a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
            flat.baddbmm_(a, b, beta=1 if add else 0)  # beta 0: acc's old values are ignored
            return
    product = _sum_to(torch.matmul(a, b), acc.shape)
    acc.add_(product) if add else acc.copy_(product)


def _slice_key(sl: slice) -> tuple:
    return (sl.start, sl.stop)


def _row_buffer(like: Tensor, shape: Sequence[int], causal: bool, keys: int, **kw) -> Tensor:
    """A buffer that the tiles write row by row: uninitialised when every row is in a tile,
    zeros when some rows have no key (causal with more queries than keys)."""
    some_rows_without_keys = causal and keys < shape[-2]
    make = torch.zeros if some_rows_without_keys else torch.empty
    return make(*shape, dtype=kw.get("dtype", like.dtype), device=like.device)


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
    """softmax(σ(q·kᵀ·scale) + bias, masked) · v, tile by tile; the forward keeps q, k, v and
    one log-sum-exp per row, the backward recomputes each tile."""

    @staticmethod
    def forward(ctx, q, k, v, keep, bias, causal, dropout_p, scale, sigma, compiled, *params):
        rng = _rng_state(q.device) if dropout_p > 0 else None
        out, lse = _tiled_forward(
            q, k, v, keep, bias, causal, dropout_p, scale, sigma, compiled, params, True
        )
        ctx.save_for_backward(q, k, v, keep, bias, lse, *params)
        ctx.meta = (causal, dropout_p, scale, sigma, compiled, rng)
        return out

    @staticmethod
    def backward(ctx, d_out):
        if torch.is_grad_enabled():  # create_graph=True: a second derivative will be taken
            return _differentiable_attention_backward(ctx, d_out)
        q, k, v, keep, bias, lse, *params = ctx.saved_tensors
        causal, dropout_p, scale, sigma, compiled, rng = ctx.meta
        keep_prob = 1.0 - dropout_p
        d_out = d_out.contiguous()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        want_dh = bias is not None and ctx.needs_input_grad[4]
        batch = d_out.shape[:-2]
        # dk, dv add up over a batch item's tiles: float32 for half precision inputs.
        acc = upcast(q).dtype
        dq = _row_buffer(q, (*batch, *q.shape[-2:]), causal, k.shape[-2])
        dk = torch.empty(*batch, *k.shape[-2:], dtype=acc, device=k.device) if need_k else None
        dv = torch.empty(*batch, *v.shape[-2:], dtype=acc, device=v.device) if need_v else None
        started: set[object] = set()  # batch slices whose dk, dv hold a first tile's sum
        d_bias = torch.zeros(bias.shape, dtype=acc, device=q.device) if want_dh else None
        d_params = torch.zeros(sum(p.numel() for p in params), dtype=acc, device=q.device)
        grad = kernel(_grad_kernel, sigma, compiled)
        replay = _replayed_rng(q.device, rng) if rng is not None else contextlib.nullcontext()
        with autocast_disabled(q.device.type), replay:
            for tile in attention_tiles(q, k, v, causal):
                q_t, k_t, v_t, d_o = (
                    _rows(q, tile),
                    _keys(k, tile),
                    _keys(v, tile),
                    _rows(d_out, tile),
                )
                raw = torch.matmul(q_t, k_t.transpose(-2, -1))
                drop = _dropout_keep(raw.shape, raw.device, dropout_p) if rng is not None else None
                dp = torch.matmul(d_o, v_t.transpose(-2, -1))
                p, d_raw, d_h, d_par = grad(
                    raw,
                    scale,
                    _scores_part(keep, tile),
                    _scores_part(bias, tile),
                    causal,
                    _rows(lse, tile),
                    dp,
                    drop,
                    keep_prob,
                    (need_v, want_dh),
                    params,
                )
                del raw, dp, drop
                # The first tile of a batch slice writes dk, dv over all keys (the keys past
                # its own are zeroed), the later ones add to them.
                first = _slice_key(tile.batch) not in started
                started.add(_slice_key(tile.batch))
                for buffer in (dk, dv) if first else ():
                    if buffer is not None and tile.keys < buffer.shape[-2]:
                        _part(buffer, tile.batch)[..., tile.keys :, :].zero_()
                if need_v:
                    _matmul_into_(_keys(dv, tile), p.transpose(-2, -1), d_o, add=not first)
                    del p
                if need_q:
                    _matmul_into_(_rows(dq, tile), d_raw, k_t, add=False)
                if need_k:
                    _matmul_into_(_keys(dk, tile), d_raw.transpose(-2, -1), q_t, add=not first)
                del d_raw
                if want_dh:
                    region = _scores_part(d_bias, tile)
                    region.add_(_sum_to(d_h, region.shape))
                d_params += d_par

        def grad_of(buffer: Tensor | None, like: Tensor, needed: bool) -> Tensor | None:
            return _sum_to(buffer, like.shape).to(like.dtype) if needed else None

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
            *split_params(d_params, params),
        )


def split_params(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """A kernel's flattened σ-parameter gradient, one tensor per parameter (its shape, dtype)."""
    grads, offset = [], 0
    for param in params:
        n = param.numel()
        grads.append(flat[offset : offset + n].reshape(param.shape).to(param.dtype))
        offset += n
    return grads


def autograd_backward(
    outputs: Tensor, inputs: Sequence[Tensor | None], needed: Sequence[bool], grad: Tensor
) -> list[Tensor | None]:
    """Gradients of ``outputs`` (weighted by ``grad``) for the ``needed`` inputs, as a
    differentiable graph (the double-backward route of the hand-written Functions)."""
    wanted = [t for t, need in zip(inputs, needed, strict=True) if need and t is not None]
    found = iter(torch.autograd.grad(outputs, wanted, grad, create_graph=True, allow_unused=True))
    return [next(found) if need and t is not None else None for t, need in zip(inputs, needed)]


def _differentiable_attention_backward(ctx, d_out):
    """The backward as autograd of the plain formula, with graph, for a second derivative:
    the hand-written backward is exact for first derivatives only (it treats the saved
    statistics as constants). Costs what the reference path costs (the whole N×M weights
    and dropout mask, redrawn); only runs when asked."""
    q, k, v, keep, bias, _lse, *params = ctx.saved_tensors
    causal, dropout_p, scale, sigma, _compiled, rng = ctx.meta
    with torch.enable_grad():
        raw = torch.matmul(q, k.transpose(-2, -1))
        p = _probs_kernel(sigma, raw, scale, keep, bias, causal, params)[0]
        if rng is not None:
            drop = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            with _replayed_rng(q.device, rng):
                for tile in attention_tiles(q, k, v, causal):
                    part = _rows(drop, tile)[..., : tile.keys]
                    part.copy_(_dropout_keep(part.shape, part.device, dropout_p))
            p = p * drop / (1.0 - dropout_p)
        out = torch.matmul(p.to(v.dtype), v)
        needed = ctx.needs_input_grad
        dq, dk, dv, d_bias, *d_params = autograd_backward(
            out, (q, k, v, bias, *params), (*needed[:3], needed[4], *needed[10:]), d_out
        )
    return (dq, dk, dv, None, d_bias, None, None, None, None, None, *d_params)


def attention_without_scores(
    q: Tensor, k: Tensor, v: Tensor, sigma: PointwiseSigma, params: Sequence[Tensor], scale: float
) -> Tensor:
    """Attention with no score at all (a batch, query or key length of 0): the empty output,
    or zeros where queries have no key (as when all their keys are masked). The graph still
    reaches q, k, v and σ's parameters, so each gets an (empty or zero) gradient."""
    h = sigma.forward(upcast(torch.matmul(q, k.transpose(-2, -1))) * scale, *params)
    return torch.matmul(h.to(v.dtype), v)


def _tiled_forward(q, k, v, keep, bias, causal, dropout_p, scale, sigma, compiled, params, lse):
    """(output, per-row log-sum-exp (m, log s) or None): the forward, tile by tile; the
    statistics only when ``lse`` (training: the backward recomputes P from them)."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    out = _row_buffer(v, (*batch, q.shape[-2], v.shape[-1]), causal, k.shape[-2])
    stats = None
    if lse:
        stats = torch.zeros(*batch, q.shape[-2], 2, dtype=upcast(q).dtype, device=q.device)
    probs = kernel(_probs_kernel if lse else _inference_kernel, sigma, compiled)
    for tile in attention_tiles(q, k, v, causal):
        raw = torch.matmul(_rows(q, tile), _keys(k, tile).transpose(-2, -1))
        p = probs(raw, scale, _scores_part(keep, tile), _scores_part(bias, tile), causal, params)
        del raw
        if lse:
            p, tile_lse = p
            _rows(stats, tile).copy_(tile_lse)
        if dropout_p > 0:  # the backward redraws these masks in this order (same generator)
            p = p * _dropout_keep(p.shape, p.device, dropout_p) / (1.0 - dropout_p)
        _matmul_into_(_rows(out, tile), p.to(v.dtype), _keys(v, tile), add=False)
        del p
    return out, stats


def _inference(q, k, v, keep, bias, causal, dropout_p, scale, sigma, compiled, params) -> Tensor:
    """The forward alone, tile by tile, saving nothing."""
    return _tiled_forward(
        q, k, v, keep, bias, causal, dropout_p, scale, sigma, compiled, params, False
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
    :func:`use_compiled_kernels`. Under autocast, q, k and v are cast as autocast casts a
    matrix product's inputs and the rest runs outside autocast.
    """
    sigma = pointwise_sigma(normalizer)
    if sigma is None:
        raise ValueError(f"{type(normalizer).__name__} has no point-wise σ kernel")
    (q, k, v), autocast_on = autocast_cast(q, k, v)
    if autocast_on:
        with autocast_disabled(q.device.type):
            return fused_attention(
                q, k, v, normalizer, keep, bias, dropout_p, scale, compiled, is_causal
            )
    params = tuple(sigma.params(normalizer))
    scores = num_scores(q, k)
    if scores == 0:
        return attention_without_scores(q, k, v, sigma, params, scale)
    if compiled is None:
        compiled = use_compiled_kernels(scores)
    rank = max(q.dim(), k.dim())
    keep = compact_mask(keep, rank)
    bias = compact_mask(None if bias is None else upcast(bias), rank)
    # Row and key views of contiguous inputs fold into batched GEMMs without copies.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bias, *params)
    )
    if not needs_grad:
        return _inference(q, k, v, keep, bias, is_causal, dropout_p, scale, sigma, compiled, params)
    return FusedSigmaSoftmaxAttention.apply(
        q, k, v, keep, bias, is_causal, dropout_p, scale, sigma, compiled, *params
    )


__all__ = [
    "COMPILE_MIN_SCORES",
    "MULTIMAX_V2_SIGMA",
    "CompiledKernel",
    "FusedSigmaSoftmaxAttention",
    "PointwiseSigma",
    "TensorCache",
    "attention_without_scores",
    "autocast_cast",
    "autocast_disabled",
    "autograd_backward",
    "compact_mask",
    "compile_available",
    "compile_policy",
    "fused_attention",
    "kernel",
    "multimax_sigma",
    "num_scores",
    "pointwise_sigma",
    "register_pointwise_sigma",
    "set_compile_policy",
    "split_params",
    "upcast",
    "use_compiled_kernels",
]

"""When the point-wise kernels run through ``torch.compile``, and how a compiled kernel is
built, cached and, where it does not compile, run eagerly instead.

The policy is ``"auto"`` (compile score tensors of at least ``COMPILE_MIN_SCORES`` entries:
below that the one-off compile costs more than it saves), ``"always"`` or ``"never"``; the
environment variable ``MULTIMAX_COMPILE`` (1 / 0 / auto) sets it at import and
:func:`set_compile_policy` changes it. Kernels are pure functions ``fn(sigma, *tensors)``;
:func:`kernel` gives one as plain PyTorch or as a cached :class:`CompiledKernel`.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .sigma import PointwiseSigma

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


def use_compiled_flex(on_cuda: bool, num_scores: int) -> bool:
    """Whether FlexAttention runs compiled: on CUDA always (a flash kernel is its point)
    unless the policy is ``"never"``; on the CPU (forward only) as :func:`use_compiled_kernels`
    says for this size."""
    if _compile_policy == "never" or not compile_available():
        return False
    return on_cuda or use_compiled_kernels(num_scores)


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


__all__ = [
    "COMPILE_MIN_SCORES",
    "CompiledKernel",
    "compile_available",
    "compile_policy",
    "kernel",
    "set_compile_policy",
    "use_compiled_flex",
    "use_compiled_kernels",
]

"""Masks in one layout, and values derived from them computed once per mask tensor.

A layer stack gets the same mask object in every layer; what is built from it (a split
additive mask, a FlexAttention block mask) is built once and reused while that tensor lives
unchanged. Masks are also brought to one layout per broadcast pattern, which is what the
compiled kernels guard on.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


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


__all__ = ["TensorCache", "compact_mask"]

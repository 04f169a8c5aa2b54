"""Half precision and autocast: where the library computes in float32 and how it leaves
autocast, so every path rounds the same way.

Half-precision scores (float16, bfloat16) are normalised in float32 and returned in their
own dtype; under autocast the kernels cast q, k, v as autocast casts a matrix product's
inputs and run the rest with autocast off.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """Half precision computes in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


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


__all__ = ["autocast_cast", "autocast_disabled", "upcast"]

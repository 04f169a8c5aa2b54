"""What the hand-written autograd Functions (fused attention, chunked loss, fused output
layer) share about returning gradients: σ's flattened parameter gradient split back per
parameter, and the differentiable route they take when a second derivative is asked for
(their own backwards are exact for first derivatives only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def split_params(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """A σ backward's flattened ``dparams``, one tensor per parameter (its shape and dtype)."""
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


__all__ = ["autograd_backward", "split_params"]

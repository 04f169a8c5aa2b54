"""How the fused attention walks the score tensor: in tiles of whole query rows.

A tile is a group of batch items and a range of query rows against keys ``0 .. keys-1``;
every N×M temporary (scores, P, dP, dR) exists one tile at a time. Under a causal mask a
tile stops at its last row's key, so the masked triangle is mostly skipped. The views and
in-place products here let a tile read its inputs and write its outputs without copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import upcast
from .sigma import PointwiseSigma


def num_scores(q: Tensor, k: Tensor) -> int:
    """Entries of the (B, H, N, M) score tensor of q (..., N, D) and k (..., M, D)."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]).numel()
    return batch * q.shape[-2] * k.shape[-2]


def causal_keep_of(h: Tensor) -> Tensor:
    """Bool (N, M) for a score block h (..., N, M) whose rows are the last N queries before
    keys 0..M-1: query i sees keys j <= i + M − N (aligned to the end, as the contract has
    it). Built from h's own sizes, so a compiled kernel needs no offset argument."""
    n, m = h.shape[-2], h.shape[-1]
    rows = torch.arange(n, device=h.device).unsqueeze(-1)
    return torch.arange(m, device=h.device) <= rows + (m - n)


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


def rows_of(t: Tensor, tile: Tile) -> Tensor:
    """The tile's query rows of a (..., N, ·) tensor (a view)."""
    return batch_part(t, tile.batch)[..., tile.rows, :]


def keys_of(t: Tensor, tile: Tile) -> Tensor:
    """The tile's keys of a (..., M, ·) tensor (a view)."""
    return batch_part(t, tile.batch)[..., : tile.keys, :]


def scores_of(t: Tensor | None, tile: Tile) -> Tensor | None:
    """The tile's part of a mask / bias broadcastable to (B, H, N, M) (a view)."""
    if t is None:
        return None
    t = batch_part(t, tile.batch)
    if t.shape[-2] != 1:
        t = t[..., tile.rows, :]
    if t.shape[-1] != 1:
        t = t[..., : tile.keys]
    return t


def sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast gradient back to ``shape``."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def batch_part(t: Tensor | None, sl: slice) -> Tensor | None:
    """The batch slice of a (possibly broadcast) 4-D mask / bias / input."""
    if t is None or sl == slice(None) or t.dim() < 4 or t.shape[0] == 1:
        return t
    return t[sl]


def matmul_into_(acc: Tensor, a: Tensor, b: Tensor, add: bool) -> None:
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
    product = sum_to(torch.matmul(a, b), acc.shape)
    acc.add_(product) if add else acc.copy_(product)


def row_buffer(like: Tensor, shape: Sequence[int], causal: bool, keys: int, **kw) -> Tensor:
    """A buffer that the tiles write row by row: uninitialised when every row is in a tile,
    zeros when some rows have no key (causal with more queries than keys)."""
    some_rows_without_keys = causal and keys < shape[-2]
    make = torch.zeros if some_rows_without_keys else torch.empty
    return make(*shape, dtype=kw.get("dtype", like.dtype), device=like.device)


def attention_without_scores(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sigma: PointwiseSigma,
    params: Sequence[Tensor],
    scale: float,
    other_params: Sequence[Tensor] = (),
) -> Tensor:
    """Attention with no score at all (a batch, query or key length of 0): the empty output,
    or zeros where queries have no key (as when all their keys are masked). The graph still
    reaches q, k, v, σ's parameters and ``other_params`` (a row map's), so each gets an
    (empty or zero) gradient."""
    h = sigma.forward(upcast(torch.matmul(q, k.transpose(-2, -1))) * scale, *params)
    out = torch.matmul(h.to(v.dtype), v)
    for param in other_params:
        out = out + 0 * param.sum().to(out.dtype)
    return out


__all__ = [
    "CAUSAL_TILE_ROWS",
    "MIN_TILE_ROWS",
    "SLICE_SCORES",
    "Tile",
    "attention_tiles",
    "attention_without_scores",
    "batch_part",
    "causal_keep_of",
    "keys_of",
    "matmul_into_",
    "num_scores",
    "row_buffer",
    "rows_of",
    "scores_of",
    "sum_to",
]

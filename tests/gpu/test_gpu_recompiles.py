"""On CUDA, MultiMax attention (forward and backward, bf16, ``impl="auto"``) over batches of
varying length builds its graphs at the first two lengths (a static build, then one with
dynamic sizes) and none after, for padding, causal and no masks: no recompile per batch
shape."""

import pytest
import torch
from torch._dynamo.utils import counters

import multimax

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LENGTHS = (37, 45, 61, 64, 100, 128, 77, 50)  # a fairseq-like mix of batch lengths
SETTLED_AFTER = 2  # a static build at the first length, one with dynamic sizes at the second


def graphs_built() -> int:
    """Graphs torch._dynamo has built in this process so far (every compile and recompile)."""
    return counters["stats"].get("unique_graphs", 0)


def graphs_per_length(
    mask_kind: str, device: str = "cuda", impl: str = "auto", batch: int = 8, heads: int = 8
) -> list[int]:
    """Graphs built at each length of :data:`LENGTHS` while attention runs forward and
    backward with ``mask_kind`` (padding | causal | none)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    normalizer = multimax.build_normalizer("multimax", order=2).to(device)
    share_kept = torch.linspace(0.5, 1.0, batch, device=device)
    builds = []
    for n in LENGTHS:
        before = graphs_built()
        q, k, v = (
            torch.randn(batch, heads, n, 64, device=device, dtype=dtype).requires_grad_()
            for _ in range(3)
        )
        mask = None
        if mask_kind == "padding":  # (B, 1, 1, N), True = keep: rows of varying length
            kept = (share_kept * n).ceil()
            mask = (torch.arange(n, device=device)[None, :] < kept[:, None])[:, None, None, :]
        out = multimax.attention(
            q, k, v, normalizer, mask=mask, is_causal=mask_kind == "causal", impl=impl
        )
        out.float().square().mean().backward()
        builds.append(graphs_built() - before)
    return builds


@pytest.mark.parametrize("mask_kind", ["padding", "causal", "none"])
def test_attention_builds_no_graph_after_the_second_batch_length(mask_kind):
    builds = graphs_per_length(mask_kind)
    per_length = ", ".join(f"{n}:{c}" for n, c in zip(LENGTHS, builds, strict=True))
    assert sum(builds[SETTLED_AFTER:]) == 0, f"graphs built per length {per_length}"

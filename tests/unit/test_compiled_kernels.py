"""Compiled kernels: one graph per input pattern, reused for every
size; a beam search's many mask / size variants never hit dynamo's recompile limit; a
kernel that does not compile runs eagerly with one warning; flex builds one block mask per
mask and does not recompile per batch shape. Compilations are counted with dynamo's own
counter on fresh caches (compiled flex runs its forward on the CPU too)."""

import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import multimax.compile_policy
import multimax.flex
import multimax.tiling
from multimax import Normalizer, attention, build_normalizer
from multimax.compile_policy import set_compile_policy
from multimax.flex import FLEX_AVAILABLE
from multimax.sigma import PointwiseSigma, register_pointwise_sigma


@pytest.fixture
def fresh_compiles():
    """Compile policy "always", empty dynamo caches and counters; restored afterwards."""
    previous = set_compile_policy("always")
    torch._dynamo.reset()
    multimax.compile_policy._COMPILED.clear()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    set_compile_policy(previous)
    torch._dynamo.reset()
    multimax.compile_policy._COMPILED.clear()


def strong_multimax():
    n = build_normalizer("multimax", order=2)
    with torch.no_grad():
        for p, value in zip(n.parameters(), ([-0.5, 0.2], [0.8, 1.5], [-0.6, 0.3], [-0.4, 0.1])):
            p.copy_(torch.tensor(value))
    return n


def beam_search_calls(scale: int):
    """(batch, queries, keys, mask kind): what a translation model's attention layers see in
    one beam search — encoder self-attention over a padded batch, incremental decoder
    self-attention (one query, a growing cache, from one key on), cross-attention with the
    source padding, beams shrinking to one as sentences finish, a learned bias. ``scale``
    changes every length and batch size that is not 1."""
    b, n, m = 5 * scale, 3 + 3 * scale, 4 + 3 * scale
    return [
        (b, n, n, "none"),
        (b, n, m, "none"),
        (b, 1, m, "padding"),
        (b, 1, 1, "causal"),
        (b, 1, 2, "causal"),
        (b - 2, 1, 3, "causal"),
        (1, 1, 4, "causal"),
        (b, n, n, "causal"),
        (b, n, m, "padding"),
        (b - 2, 1, m, "padding"),
        (1, 1, m, "padding"),
        (b, n, n, "bool"),
        (b, n, m, "bias"),
        (1, n, m, "bias"),
    ]


def call_inputs(b, n, m, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, 4, length, 8, generator=g) for length in (n, m, m))
    mask = None
    if kind == "padding":  # fairseq's key padding: (B, 1, 1, M), expanded from (M,)
        mask = (torch.arange(m) < max(m - 1, 1)).expand(b, 1, 1, m)
    elif kind == "bool":
        mask = torch.rand(b, 4, n, m, generator=g) > 0.3
    elif kind == "bias":
        mask = torch.randn(b, 1, n, m, generator=g)
    return q, k, v, mask, kind == "causal"


def test_a_beam_search_compiles_one_graph_per_pattern_and_no_more_for_new_sizes(fresh_compiles):
    """Fourteen variants (more than dynamo's recompile limit of 8 for one kernel) through
    the inference kernel shared by every layer: no hard failure, no warning, each output
    equals the reference; a second search with other sizes compiles nothing new."""
    normalizer = strong_multimax()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", RuntimeWarning)  # no eager fallback either
        for scale in (1, 2):
            before = fresh_compiles()
            for b, n, m, kind in beam_search_calls(scale):
                q, k, v, mask, causal = call_inputs(b, n, m, kind)
                got = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="inference")
                want = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="reference")
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            if scale == 1:
                first = fresh_compiles() - before
                (kern,) = multimax.compile_policy._COMPILED.values()
                assert first == len(kern.graphs) <= len(beam_search_calls(1))
            else:
                assert fresh_compiles() == before  # every pattern reused at new sizes


def test_training_kernels_do_not_recompile_for_new_lengths(fresh_compiles):
    """Forward and backward kernels of a variable-length epoch (padding, N == M and N != M):
    one graph each, built on the first batch."""
    normalizer = strong_multimax()
    for i, (b, n, m) in enumerate([(4, 6, 6), (3, 9, 11), (2, 13, 13), (5, 7, 10)]):
        q, k, v, mask, _ = call_inputs(b, n, m, "padding", seed=i)
        q.requires_grad_()
        out = attention(q, k, v, normalizer, mask=mask, impl="fused")
        out.sum().backward()
        if i == 0:
            first = fresh_compiles()
    assert fresh_compiles() == first == 2  # the forward and the backward kernel


class _BreakingShift(Normalizer):
    """softmax(x + c) whose registered σ kernel breaks the graph (a call dynamo cannot
    trace, as a user's σ might hold), so fullgraph compilation fails."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor([0.25]))

    def transform(self, x):
        return x + self.shift


def _breaking_forward(x, shift):
    torch._dynamo.graph_break()
    return x + shift


def _breaking_backward(x, dh, shift):
    return dh, dh.sum().reshape(1)


register_pointwise_sigma(
    _BreakingShift,
    lambda n: PointwiseSigma(
        "breaking", _breaking_forward, _breaking_backward, lambda n: (n.shift,)
    ),
)


def test_a_kernel_that_does_not_compile_runs_eagerly_with_one_warning(fresh_compiles):
    normalizer = _BreakingShift()
    q, k, v, mask, _ = call_inputs(2, 5, 6, "padding")
    want = attention(q, k, v, normalizer, mask=mask, impl="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            first = attention(q, k, v, normalizer, mask=mask, impl="inference")
            again = attention(q, k, v, normalizer, mask=mask, impl="inference")
    compile_warnings = [w for w in caught if "torch.compile could not build" in str(w.message)]
    assert len(compile_warnings) == 1
    assert "inference_kernel_breaking" in str(compile_warnings[0].message)
    torch.testing.assert_close(first, want)
    torch.testing.assert_close(again, want)


@pytest.mark.skipif(not FLEX_AVAILABLE, reason="torch has no FlexAttention")
def test_flex_builds_one_block_mask_per_mask_and_no_graph_per_batch_shape(
    fresh_compiles, monkeypatch
):
    """A variable-length epoch through compiled flex (CPU forward): two layers share each
    batch's padding mask, so its block mask is built once per batch, not once per layer
    (and broadcasts over heads); the kernel compiles once for the whole epoch (every length
    fits one 128-block). On the CPU inductor builds this kernel for MultiMax of order 2; for
    some other σ its CPU template does not compile, and that kernel runs eagerly instead."""
    built = []
    real = multimax.flex.create_block_mask

    def counting(*args, **kwargs):
        built.append(args[1:5])
        return real(*args, **kwargs)

    monkeypatch.setattr(multimax.flex, "create_block_mask", counting)
    layers = [strong_multimax(), build_normalizer("multimax", order=2)]
    batches = [(4, 37), (3, 50), (2, 64), (5, 21), (3, 90)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", RuntimeWarning)  # compiled, no eager fallback
        for i, (b, n) in enumerate(batches):
            g = torch.Generator().manual_seed(i)
            q, k, v = (torch.randn(b, 2, n, 16, generator=g) for _ in range(3))
            lengths = torch.randint(1, n + 1, (b,), generator=g)
            lengths[0] = n
            padding = (torch.arange(n) < lengths[:, None])[:, None, None, :]
            for layer in layers:
                got = attention(q, k, v, layer, mask=padding, is_causal=True, impl="flex")
                want = attention(q, k, v, layer, mask=padding, is_causal=True, impl="reference")
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [shape[:2] for shape in built] == [(b, 1) for b, _ in batches]
    assert fresh_compiles() == 1


def test_causal_tiles_do_not_recompile_for_new_lengths(fresh_compiles, monkeypatch):
    """A causal epoch in many tiles (rows split evenly, never one row alone; each
    tile's causal mask built in the kernel from its own sizes): one forward and one backward
    graph for every length, N == M and N != M (a cache)."""
    monkeypatch.setattr(multimax.tiling, "SLICE_SCORES", 64)
    monkeypatch.setattr(multimax.tiling, "CAUSAL_TILE_ROWS", 3)
    monkeypatch.setattr(multimax.tiling, "MIN_TILE_ROWS", 1)
    normalizer = strong_multimax()
    for i, (b, n, m) in enumerate([(4, 6, 6), (3, 9, 11), (2, 13, 13), (5, 7, 10), (3, 17, 17)]):
        q, k, v, mask, _ = call_inputs(b, n, m, "padding", seed=i)
        q.requires_grad_()
        out = attention(q, k, v, normalizer, mask=mask, is_causal=True, impl="fused")
        want = attention(q, k, v, normalizer, mask=mask, is_causal=True, impl="reference")
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        out.sum().backward()
        assert len(multimax.tiling.attention_tiles(q, k, v, True)) > 2
        if i == 0:
            first = fresh_compiles()
    assert fresh_compiles() == first == 2

"""The fused path in tiles instead of an N×M tensor: many tiles (rows split, batch items
grouped, causal tiles cut at their last row) equal the reference, dropout masks are redrawn
tile by tile, and no score tensor is ever held."""

import pytest
import torch
from attention_cases import (
    NORMALIZERS,
    ROW_MAPS,
    assert_same,
    fast_and_reference,
    inputs,
    masks,
    masks4,
    run_with_grads,
)

import multimax
import multimax.tiling
from experiments.pipelines.benchmark.timing import cpu_peak_bytes
from multimax import attention
from multimax.compile_policy import set_compile_policy


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few scores, so small inputs run as many tiles (rows and batch items)."""

    def set_tiles(scores: int, causal_rows: int = 3) -> None:
        monkeypatch.setattr(multimax.tiling, "SLICE_SCORES", scores)
        monkeypatch.setattr(multimax.tiling, "CAUSAL_TILE_ROWS", causal_rows)
        monkeypatch.setattr(multimax.tiling, "MIN_TILE_ROWS", 1)

    return set_tiles


@pytest.mark.parametrize("mask_name", ["bool", "additive", "causal+padding"])
def test_fused_in_batch_slices_equals_reference(monkeypatch, mask_name):
    """Tiles of one score: forward, backward and inference run two rows at a time."""
    monkeypatch.setattr(multimax.tiling, "SLICE_SCORES", 1)
    monkeypatch.setattr(multimax.tiling, "MIN_TILE_ROWS", 1)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(n=7)
    mask, causal = masks(2, 7, 7)[mask_name]
    fast, ref = fast_and_reference("fused", q, k, v, normalizer, mask, causal)
    assert_same(fast, ref)
    with torch.no_grad():
        infer = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="inference")
    torch.testing.assert_close(infer, ref[0], atol=1e-5, rtol=1e-5)


def test_fused_with_keys_shared_across_the_batch(monkeypatch):
    monkeypatch.setattr(multimax.tiling, "SLICE_SCORES", 1)
    monkeypatch.setattr(multimax.tiling, "MIN_TILE_ROWS", 1)
    normalizer = NORMALIZERS["multimax1"]()
    q = inputs(b=3, n=5)[0]
    k, v = (t[:1].detach().clone().requires_grad_() for t in inputs(b=1, n=5, seed=3)[1:])
    ref = run_with_grads(
        lambda: attention(q, k, v, normalizer, impl="reference"), q, k, v, normalizer
    )
    fast = run_with_grads(lambda: attention(q, k, v, normalizer, impl="fused"), q, k, v, normalizer)
    assert_same(fast, ref)


@pytest.mark.parametrize(
    ("norm", "scores"),
    [(norm, scores) for norm in ("multimax2", "multimax1", "multimax_v2", "softmax_learned")
     for scores in (40, 200)]
    + [(norm, 40) for norm in ROW_MAPS[::2]],
)  # fmt: skip
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal", "causal+padding"])
def test_many_tiles_equal_the_reference(small_tiles, norm, mask_name, scores):
    """Rows split into tiles, batch items grouped (b = 4), causal tiles cut at their last
    row: outputs and gradients of q, k, v and σ, and the no-grad path, equal the reference."""
    small_tiles(scores)
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(b=4, n=9, m=9 if "causal" in mask_name else 11)
    mask, causal = masks4(9, k.shape[2])[mask_name]
    tiles = multimax.tiling.attention_tiles(q, k, v, causal)
    assert len({t.rows.start for t in tiles}) > 1 and len({str(t.batch) for t in tiles}) > 1
    fast, ref = fast_and_reference("fused", q, k, v, normalizer, mask, causal)
    # σ's gradients sum ~1200 terms of size ~10, in another order than the reference's.
    assert_same(fast, ref, tol=5e-5)
    with torch.no_grad():
        infer = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="inference")
    torch.testing.assert_close(infer, ref[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("n", "m"), [(9, 4), (4, 9), (1, 7)])
def test_causal_with_more_queries_or_more_keys_equals_the_reference(small_tiles, n, m):
    """Causality aligned to the end: with more queries than keys the first rows see no key
    (zeros, in no tile); with more keys (a cache) every row sees M − N keys more."""
    small_tiles(30, causal_rows=2)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(n=n, m=m)
    fast, ref = fast_and_reference("fused", q, k, v, normalizer, None, True)
    assert_same(fast, ref)
    if n > m:
        assert (fast[0][:, :, : n - m] == 0).all()
        covered = {i for t in multimax.tiling.attention_tiles(q, k, v, True) for i in
                   range(t.rows.start, t.rows.stop)}  # fmt: skip
        assert min(covered) > 0  # a tile holding only rows without keys is skipped


def test_causal_tiles_skip_the_keys_above_the_diagonal():
    """Each causal tile reads only the keys up to its last row: about half the scores (plus
    the tiles' own triangles) are ever computed."""
    q = k = v = torch.empty(2, 8, 1024, 64)
    tiles = multimax.tiling.attention_tiles(q, k, v, causal=True)
    long = multimax.tiling.attention_tiles(*(torch.empty(1, 8, 8192, 64),) * 3, causal=False)
    assert min(t.rows.stop - t.rows.start for t in long) >= multimax.tiling.MIN_TILE_ROWS
    assert all(t.keys == t.rows.stop for t in tiles)
    rows = multimax.tiling.CAUSAL_TILE_ROWS
    assert max(t.rows.stop - t.rows.start for t in tiles) <= rows
    computed = sum((t.rows.stop - t.rows.start) * t.keys for t in tiles)
    assert computed <= 1024 * (1024 + rows) / 2
    full = multimax.tiling.attention_tiles(q, k, v, causal=False)
    assert all(t.keys == 1024 for t in full)


def test_dropout_masks_are_redrawn_tile_by_tile_in_the_backward(small_tiles):
    """Nothing N×M is saved: the backward redraws each tile's dropout mask from the saved
    generator state, in the forward's order; outputs and gradients equal an explicit
    computation with those masks, and the global generator moves as after the forward."""
    small_tiles(40)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(b=4, n=9, m=9)
    torch.manual_seed(11)
    out = attention(q, k, v, normalizer, dropout_p=0.3, is_causal=True, impl="fused")
    after_forward = torch.get_rng_state()
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    assert torch.equal(torch.get_rng_state(), after_forward)
    got = [t.grad.clone() for t in (q, k, v, *normalizer.parameters())]
    for t in (q, k, v, *normalizer.parameters()):
        t.grad = None
    torch.manual_seed(11)
    drop = torch.zeros(4, 3, 9, 9, dtype=torch.bool)
    for tile in multimax.tiling.attention_tiles(q, k, v, True):
        part = drop[tile.batch][..., tile.rows, : tile.keys]
        part.copy_(torch.rand(part.shape) >= 0.3)
    p = multimax.attention_with_weights(q, k, v, normalizer, is_causal=True)[1]
    explicit = (p * drop / 0.7) @ v
    explicit.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    torch.testing.assert_close(out, explicit, atol=1e-5, rtol=1e-5)
    for g, t in zip(got, (q, k, v, *normalizer.parameters()), strict=True):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_tiled_attention_never_holds_a_score_tensor(small_tiles):
    """Peak memory of forward + backward (causal, N = 512): below a quarter of one N×M
    score tensor with small tiles, where the reference holds several."""
    small_tiles(1 << 12, causal_rows=16)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = (torch.randn(1, 2, 512, 16, requires_grad=True) for _ in range(3))
    score_bytes = 2 * 512 * 512 * 4

    def run(impl):
        def call():
            attention(q, k, v, normalizer, is_causal=True, impl=impl).sum().backward()

        return call

    fused = cpu_peak_bytes(run("fused"))
    reference = cpu_peak_bytes(run("reference"))
    assert fused < score_bytes / 4 < 3 * score_bytes < reference

    def infer():
        with torch.no_grad():
            attention(q, k, v, normalizer, is_causal=True, impl="inference")

    assert cpu_peak_bytes(infer) < score_bytes / 4


def test_compiled_tiles_equal_the_reference(small_tiles):
    """Compiled kernels over many tiles (causal in the kernel, a padding mask, a bias)."""
    small_tiles(60)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(b=4, n=9, m=9)
    padding = masks4(9, 9)["causal+padding"][0]
    previous = set_compile_policy("always")
    try:
        fast, ref = fast_and_reference("fused", q, k, v, normalizer, padding, True)
        bias = masks4(9, 9)["additive"][0]
        fast_b, ref_b = fast_and_reference("fused", q, k, v, normalizer, bias, False)
    finally:
        set_compile_policy(previous)
    assert_same(fast, ref, tol=1e-4)
    assert_same(fast_b, ref_b, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_tiles_in_half_precision_are_as_accurate_as_the_reference(small_tiles, dtype):
    """Half precision over many tiles: dk, dv add up over tiles in float32, so the tiled
    gradients are no further from float64 than the reference's (exact scores, as above)."""
    small_tiles(40)
    normalizer = NORMALIZERS["multimax2"]()
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randint(-2, 3, (4, 3, 9, 8), generator=g) * 0.5 for _ in range(2))
    v = torch.randn(4, 3, 9, 8, generator=g)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))

    def run(impl, q, k, v, normalizer):
        return run_with_grads(
            lambda: attention(q, k, v, normalizer, is_causal=True, scale=0.25, impl=impl),
            q,
            k,
            v,
            normalizer,
        )

    fast, ref = run("fused", q, k, v, normalizer), run("reference", q, k, v, normalizer)
    exact_normalizer = NORMALIZERS["multimax2"]().double()
    exact = run("reference", *(t.detach().double().requires_grad_() for t in (q, k, v)),
                exact_normalizer)  # fmt: skip
    eps = torch.finfo(dtype).eps
    for got, base, want in zip([fast[0], *fast[1]], [ref[0], *ref[1]], [exact[0], *exact[1]]):
        error = lambda a, want=want: (a.double() - want).abs().max().item()  # noqa: E731
        assert error(got) <= 2 * error(base) + eps * want.abs().max()

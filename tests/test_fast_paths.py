"""Fast attention paths (fused, inference, flex) equal the reference: outputs, and gradients
of q, k, v, the σ parameters and an additive mask, with masks, causality and empty rows."""

import math

import pytest
import torch

import multimax
import multimax.fused
from multimax import attention, build_normalizer
from multimax.attention import (
    ATTENTION_PATHS,
    AttentionInputs,
    select_path,
    split_mask,
    use_attention_impl,
)
from multimax.flex import FLEX_AVAILABLE, flex_sigma_attention
from multimax.fused import fused_attention, set_compile_policy

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_flex = pytest.mark.skipif(not FLEX_AVAILABLE, reason="torch has no FlexAttention")


def strong(name: str, **options):
    """A normaliser far from softmax: big σ parameters, a negative high coefficient."""
    n = build_normalizer(name, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in n.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        if name.startswith("multimax"):
            n.high_coef[0] = -0.8  # slope 0.2 above d_1: may reorder scores
        if name == "multimax_v2":
            n.affine_scale.fill_(1.3)  # h = 1.3·x + 0.4
            n.affine_shift.fill_(0.4)
    return n


NORMALIZERS = {
    "multimax2": lambda: strong("multimax", order=2),
    "multimax1": lambda: strong("multimax", order=1),
    "multimax3": lambda: strong("multimax", order=3),
    "multimax_v2": lambda: strong("multimax_v2"),
    "softmax_T0.5": lambda: build_normalizer("softmax", temperature=0.5),
    "softmax_learned": lambda: strong("softmax", temperature=2.0, learn_temperature=True),
}


def inputs(b=2, h=3, n=9, m=None, d=8, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    return [
        (torch.randn(b, h, length, d, generator=g) * 2).to(device).requires_grad_()
        for length in (n, m, m)
    ]


def masks(b, n, m):
    """name -> (mask, is_causal); includes rows with every key masked."""
    keep = torch.rand(b, 1, n, m, generator=torch.Generator().manual_seed(2)) > 0.35
    keep[0, 0, 1] = False  # an empty row
    bias = torch.randn(b, 1, n, m, generator=torch.Generator().manual_seed(3))
    bias = bias.masked_fill(~keep, float("-inf"))
    padding = (torch.arange(m)[None, :] < torch.tensor([m, m // 2])[:, None])[:, None, None]
    return {
        "none": (None, False),
        "bool": (keep, False),
        "additive": (bias, False),
        "causal": (None, True),
        "causal+padding": (padding, True),
    }


def run_with_grads(fn, q, k, v, normalizer, bias_param=None):
    for t in (q, k, v, *normalizer.parameters()):
        t.grad = None
    out = fn()
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights.to(out.device)).sum().backward()
    grads = [t.grad for t in (q, k, v, *normalizer.parameters())]
    if bias_param is not None:
        grads.append(bias_param.grad)
        bias_param.grad = None
    return out.detach(), grads


def fast_and_reference(impl, q, k, v, normalizer, mask, causal):
    """(output, grads) of path ``impl`` and of the reference on the same inputs."""

    def run(name):
        return run_with_grads(
            lambda: attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl=name),
            q,
            k,
            v,
            normalizer,
        )

    return run(impl), run("reference")


def assert_same(fast, ref, tol=1e-5):
    out_f, grads_f = fast
    out_r, grads_r = ref
    torch.testing.assert_close(out_f, out_r, atol=tol, rtol=tol)
    assert len(grads_f) == len(grads_r)
    for gf, gr in zip(grads_f, grads_r, strict=True):
        assert (gf is None) == (gr is None)
        if gr is not None:
            torch.testing.assert_close(gf, gr, atol=tol, rtol=tol)


@pytest.mark.parametrize("norm", list(NORMALIZERS))
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal", "causal+padding"])
def test_fused_equals_reference(norm, mask_name):
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(n=7, m=11 if mask_name != "causal+padding" else 7)
    mask, causal = masks(2, q.shape[2], k.shape[2])[mask_name]
    fast, ref = fast_and_reference("fused", q, k, v, normalizer, mask, causal)
    assert_same(fast, ref)
    if mask_name == "bool":  # the empty row outputs zeros and passes no gradient
        assert fast[0][0, 0, 1].abs().max() == 0


def test_fused_gradient_of_a_learned_additive_bias():
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(n=6)
    bias = torch.randn(1, 3, 6, 6, requires_grad=True)
    ref = run_with_grads(
        lambda: attention(q, k, v, normalizer, mask=bias, impl="reference"),
        q,
        k,
        v,
        normalizer,
        bias,
    )
    fast = run_with_grads(
        lambda: attention(q, k, v, normalizer, mask=bias, impl="fused"), q, k, v, normalizer, bias
    )
    assert_same(fast, ref)


@pytest.mark.parametrize("norm", ["multimax2", "multimax3", "multimax_v2"])
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal"])
def test_inference_path_equals_reference_without_grad(norm, mask_name):
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(n=7)
    mask, causal = masks(2, 7, 7)[mask_name]
    with torch.no_grad():
        ref = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="reference")
        fast = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="inference")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_inference_path_refuses_when_gradients_are_needed():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="paths that can: .*fused.*reference"):
        attention(q, k, v, NORMALIZERS["multimax2"](), impl="inference")


def _saved_sizes(fn):
    """Sizes of the distinct tensors autograd keeps for backward."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(sizes.values())


def test_fused_saves_no_score_tensor_for_backward():
    """Eager softmax attention keeps its N×M weights for backward, the reference more; the
    tiled path keeps q, k, v and two numbers per query row, nothing N×M (issue 14)."""
    q, k, v = inputs(n=16, d=4)
    scores = 2 * 3 * 16 * 16
    eager = _saved_sizes(lambda: torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v)
    fused = _saved_sizes(lambda: attention(q, k, v, NORMALIZERS["multimax2"](), impl="fused"))
    reference = _saved_sizes(
        lambda: attention(q, k, v, NORMALIZERS["multimax2"](), impl="reference")
    )
    count = lambda sizes: sum(s >= scores for s in sizes)  # noqa: E731
    assert count(eager) == 1 and count(reference) > 1
    assert count(fused) == 0
    assert sorted(fused, reverse=True)[:4] == [q.numel(), k.numel(), v.numel(), 2 * 3 * 16 * 2]


def test_fused_dropout_matches_an_explicit_computation_with_the_same_mask():
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(n=6)
    torch.manual_seed(5)
    out = attention(q, k, v, normalizer, dropout_p=0.3, impl="fused")
    out.sum().backward()
    fused_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(5)
    p = multimax.attention_with_weights(q, k, v, normalizer)[1]
    keep = torch.rand(p.shape) >= 0.3
    explicit = (p * keep / 0.7) @ v
    explicit.sum().backward()
    torch.testing.assert_close(out, explicit, atol=1e-5, rtol=1e-5)
    for got, want in zip(fused_grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_selection_by_normaliser_grad_mode_and_size():
    q, k, v = inputs()
    small = AttentionInputs(q, k, v, NORMALIZERS["multimax2"](), None, None, False, 0.0, 0.3)
    assert select_path(small) == "reference"  # tiny: compiling would cost more than it saves
    softmax = AttentionInputs(q, k, v, build_normalizer("softmax"), None, None, False, 0.0, 0.3)
    assert select_path(softmax) == "sdpa"
    sparse = AttentionInputs(q, k, v, build_normalizer("sparsemax"), None, None, False, 0.0, 0.3)
    previous = set_compile_policy("always")
    try:
        assert select_path(small) == "fused"
        with torch.no_grad():
            assert select_path(small) == "inference"
        assert select_path(sparse) == "reference"
        assert select_path(softmax) == "sdpa"
    finally:
        set_compile_policy(previous)


def test_forcing_a_path_that_cannot_run_names_those_that_can():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"'fused'.*paths that can: reference"):
        attention(q, k, v, "sparsemax", impl="fused")
    if not CUDA:
        with pytest.raises(ValueError, match=r"'flex'.*paths that can: fused, reference"):
            attention(q, k, v, NORMALIZERS["multimax2"](), impl="flex")
    with pytest.raises(ValueError, match="valid: auto, sdpa, flex"):
        attention(q, k, v, "softmax", impl="triton")


def test_use_attention_impl_overrides_auto_only():
    q, k, v = inputs()
    normalizer = NORMALIZERS["multimax2"]()
    with use_attention_impl("fused"):
        fused = attention(q, k, v, normalizer)
        assert fused.grad_fn.name().endswith("FusedSigmaSoftmaxAttentionBackward")
        ref = attention(q, k, v, normalizer, impl="reference")
        assert "Fused" not in ref.grad_fn.name()
    assert "Fused" not in attention(q, k, v, normalizer).grad_fn.name()
    with pytest.raises(ValueError, match="unknown attention impl"), use_attention_impl("nope"):
        pass


def test_paths_are_registered_in_auto_order():
    assert list(ATTENTION_PATHS) == ["sdpa", "flex", "inference", "fused", "reference"]


@pytest.mark.parametrize("norm", ["multimax2", "multimax3", "multimax_v2"])
def test_compiled_kernels_equal_reference(norm):
    """One configuration through torch.compile'd kernels (forward, backward, inference)."""
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(n=7, m=9)
    mask, _ = masks(2, 7, 9)["additive"]
    keep, bias = split_mask(mask, torch.float32)
    ref = run_with_grads(
        lambda: attention(q, k, v, normalizer, mask=mask, impl="reference"), q, k, v, normalizer
    )
    fast = run_with_grads(
        lambda: fused_attention(
            q, k, v, normalizer, keep, bias, scale=1 / math.sqrt(8), compiled=True
        ),
        q,
        k,
        v,
        normalizer,
    )
    assert_same(fast, ref)


# --- FlexAttention -------------------------------------------------------------------------


@needs_flex
@pytest.mark.parametrize("norm", ["multimax2", "multimax3", "multimax_v2"])
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal", "causal+padding"])
def test_flex_forward_equals_reference_on_this_device(norm, mask_name):
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(n=9)
    mask, causal = masks(2, 9, 9)[mask_name]
    with torch.no_grad():
        ref = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="reference")
        fast = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="flex")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@needs_flex
def test_flex_with_more_keys_than_queries_aligns_causal_to_the_end():
    q, k, v = inputs(n=5, m=9)
    normalizer = NORMALIZERS["softmax_T0.5"]()
    with torch.no_grad():
        ref = attention(q, k, v, normalizer, is_causal=True, impl="reference")
        fast = flex_sigma_attention(q, k, v, normalizer, is_causal=True, scale=1 / math.sqrt(8))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@needs_cuda
@needs_flex
@pytest.mark.parametrize(
    "norm", ["multimax2", "multimax1", "multimax3", "multimax_v2", "softmax_learned"]
)
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal", "causal+padding"])
def test_flex_gradients_equal_reference_on_cuda(norm, mask_name):
    normalizer = NORMALIZERS[norm]().cuda()
    q, k, v = inputs(n=40, d=16, device="cuda")
    mask, causal = masks(2, 40, 40)[mask_name]
    mask = None if mask is None else mask.cuda()
    fast, ref = fast_and_reference("flex", q, k, v, normalizer, mask, causal)
    assert_same(fast, ref, tol=1e-4)  # TF32-free fp32, but blockwise sums reorder


@needs_cuda
def test_auto_takes_flex_on_cuda_and_fused_kernels_compile_there():
    normalizer = NORMALIZERS["multimax2"]().cuda()
    q, k, v = inputs(n=40, d=16, device="cuda")
    probe = AttentionInputs(q, k, v, normalizer, None, None, False, 0.0, 0.25)
    assert select_path(probe) == ("flex" if FLEX_AVAILABLE else "reference")
    ref = run_with_grads(
        lambda: attention(q, k, v, normalizer, impl="reference"), q, k, v, normalizer
    )
    fast = run_with_grads(
        lambda: fused_attention(q, k, v, normalizer, scale=0.25, compiled=True), q, k, v, normalizer
    )
    assert_same(fast, ref, tol=1e-4)


@pytest.mark.parametrize("mask_name", ["bool", "additive", "causal+padding"])
def test_fused_in_batch_slices_equals_reference(monkeypatch, mask_name):
    """Tiles of one score: forward, backward and inference run two rows at a time."""
    monkeypatch.setattr(multimax.fused, "SLICE_SCORES", 1)
    monkeypatch.setattr(multimax.fused, "MIN_TILE_ROWS", 1)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = inputs(n=7)
    mask, causal = masks(2, 7, 7)[mask_name]
    fast, ref = fast_and_reference("fused", q, k, v, normalizer, mask, causal)
    assert_same(fast, ref)
    with torch.no_grad():
        infer = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="inference")
    torch.testing.assert_close(infer, ref[0], atol=1e-5, rtol=1e-5)


def test_fused_with_keys_shared_across_the_batch(monkeypatch):
    monkeypatch.setattr(multimax.fused, "SLICE_SCORES", 1)
    monkeypatch.setattr(multimax.fused, "MIN_TILE_ROWS", 1)
    normalizer = NORMALIZERS["multimax1"]()
    q = inputs(b=3, n=5)[0]
    k, v = (t[:1].detach().clone().requires_grad_() for t in inputs(b=1, n=5, seed=3)[1:])
    ref = run_with_grads(
        lambda: attention(q, k, v, normalizer, impl="reference"), q, k, v, normalizer
    )
    fast = run_with_grads(lambda: attention(q, k, v, normalizer, impl="fused"), q, k, v, normalizer)
    assert_same(fast, ref)


@pytest.mark.parametrize("norm", ["multimax1", "multimax2", "multimax3", "multimax_v2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_and_inference_in_half_precision_are_as_accurate_as_the_reference(norm, dtype):
    """Half-precision q, k, v: outputs and gradients of the fast paths are no further from
    float64 (same inputs) than the reference path's. q and k hold multiples of 1/2 and the
    scale is 1/4, so every score is exact in half precision on both paths: what is compared
    is the normaliser's arithmetic, not the rounding of the scores (σ is steep enough that
    one rounding of a score moves a σ-parameter gradient by several percent in bf16)."""
    normalizer = NORMALIZERS[norm]()
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randint(-2, 3, (2, 3, n, 8), generator=g) * 0.5 for n in (7, 9))
    v = torch.randn(2, 3, 9, 8, generator=g)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    mask, _ = masks(2, 7, 9)["additive"]

    def run(impl, q, k, v, normalizer, mask):
        return run_with_grads(
            lambda: attention(q, k, v, normalizer, mask=mask, scale=0.25, impl=impl),
            q,
            k,
            v,
            normalizer,
        )

    fast, ref = run("fused", q, k, v, normalizer, mask), run("reference", q, k, v, normalizer, mask)
    with torch.no_grad():
        infer = attention(q, k, v, normalizer, mask=mask, scale=0.25, impl="inference")
    exact_normalizer = NORMALIZERS[norm]().double()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = run("reference", q64, k64, v64, exact_normalizer, mask.double())
    assert fast[0].dtype == infer.dtype == dtype

    def error(a, b):
        return (a.double() - b).abs().max().item()

    eps = torch.finfo(dtype).eps  # one rounding of the largest entry: noise, not a loss
    for got in (fast[0], infer):
        assert error(got, exact[0]) <= 2 * error(ref[0], exact[0]) + eps * exact[0].abs().max()
    for got, base, want in zip(fast[1], ref[1], exact[1], strict=True):
        assert error(got, want) <= 2 * error(base, want) + eps * want.abs().max()


# --- issue 11: every fast path right wherever it is chosen -------------------------------------


def test_sdpa_with_a_temperature_adds_a_finite_bias_after_dividing_by_t():
    """softmax(x / T + bias), as the contract, the reference and the fused path have it."""
    normalizer = build_normalizer("softmax", temperature=0.5)
    q, k, v = inputs(n=6)
    bias = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(7))
    bias[0, 0, 2, :4] = float("-inf")
    x = q @ k.transpose(-2, -1) / math.sqrt(8)
    by_hand = torch.softmax(x / 0.5 + bias, -1) @ v
    for impl in ("sdpa", "reference", "fused"):
        out = attention(q, k, v, normalizer, mask=bias, impl=impl)
        torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=1e-5, msg=impl)


def test_softmax_with_a_fixed_temperature_takes_sdpa_ahead_of_flex():
    """Softmax baselines run what stock timm / fairseq run: SDPA comes first in the auto
    order and accepts them, so flex (CUDA) never gets them; σ normalisers skip SDPA."""
    q, k, v = inputs()
    order = list(ATTENTION_PATHS)
    assert order.index("sdpa") < order.index("flex")
    for options in ({}, {"temperature": 0.5}):
        probe = AttentionInputs(
            q, k, v, build_normalizer("softmax", **options), None, None, False, 0.0, 0.3
        )
        assert ATTENTION_PATHS["sdpa"].auto_ok(probe)
        assert select_path(probe) == "sdpa"
    for norm in ("multimax2", "multimax_v2", "softmax_learned"):
        probe = AttentionInputs(q, k, v, NORMALIZERS[norm](), None, None, False, 0.0, 0.3)
        assert not ATTENTION_PATHS["sdpa"].can_run(probe)


@needs_cuda
def test_on_cuda_softmax_takes_sdpa_and_sigma_normalisers_take_flex():
    q, k, v = inputs(n=40, d=16, device="cuda")
    for name, expected in (
        ("softmax", "sdpa"),
        ("multimax2", "flex" if FLEX_AVAILABLE else "fused"),
    ):
        normalizer = (
            build_normalizer("softmax") if name == "softmax" else NORMALIZERS[name]()
        ).cuda()
        probe = AttentionInputs(q, k, v, normalizer, None, None, False, 0.0, 0.25)
        if expected != "fused":
            assert select_path(probe) == expected


def _cpu_autocast_run(impl, normalizer, grads):
    q, k, v = inputs(n=7, m=9)
    mask, _ = masks(2, 7, 9)["additive"]
    leaves = [q, k, v, *normalizer.parameters()]
    for t in leaves:
        t.grad = None
    with torch.set_grad_enabled(grads), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, normalizer, mask=mask, impl=impl)
    if grads:
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize(
    ("impl", "norm"),
    [
        ("reference", "multimax2"),
        ("sdpa", "softmax_T0.5"),
        ("fused", "multimax2"),
        ("fused", "multimax_v2"),
        ("fused", "softmax_learned"),
        ("inference", "multimax2"),
        pytest.param("flex", "multimax2", marks=needs_flex),
    ],
)
def test_every_path_runs_forward_and_backward_under_cpu_bf16_autocast(impl, norm):
    """fp32 q, k, v under bf16 autocast: the products run in bf16 as autocast runs them and
    the path agrees with the reference under the same autocast (forward-only paths: no grad)."""
    grads = impl not in ("inference", "flex")
    normalizer = NORMALIZERS[norm]()
    out, got = _cpu_autocast_run(impl, normalizer, grads)
    ref, want = _cpu_autocast_run("reference", normalizer, grads)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, atol=3e-2 * w.abs().max().item() + 1e-3, rtol=0)


def _second_derivatives(impl, q, k, v, normalizer, mask, causal):
    """d/d(leaves) of Σ r·(d/d(leaves) Σ w·out): what gradient penalties and Hessian-vector
    products compute."""
    leaves = [q, k, v, *normalizer.parameters()]
    out = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl=impl)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    first = torch.autograd.grad((out * w).sum(), leaves, create_graph=True)
    g = torch.Generator().manual_seed(9)
    mix = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype)).sum() for d in first)
    return [d.detach() for d in first], torch.autograd.grad(mix, leaves, allow_unused=True)


@pytest.mark.parametrize("norm", ["multimax2", "multimax3", "multimax_v2", "softmax_learned"])
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal+padding"])
def test_second_derivatives_through_the_fused_path_equal_the_reference(norm, mask_name):
    normalizer = NORMALIZERS[norm]().double()
    q, k, v = (
        t.detach().double().requires_grad_()
        for t in inputs(n=5, m=5 if "causal" in mask_name else 6, d=4)
    )
    mask, causal = masks(2, 5, k.shape[2])[mask_name]
    mask = None if mask is None or mask.dtype == torch.bool else mask.double()
    if mask_name == "bool":
        mask = masks(2, 5, 6)["bool"][0]
    first_f, second_f = _second_derivatives("fused", q, k, v, normalizer, mask, causal)
    first_r, second_r = _second_derivatives("reference", q, k, v, normalizer, mask, causal)
    for a, b in zip(first_f + list(second_f), first_r + list(second_r), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_fused_attention_passes_gradgradcheck():
    normalizer = NORMALIZERS["multimax2"]().double()
    q, k, v = (t.detach().double().requires_grad_() for t in inputs(b=1, h=2, n=4, d=3))
    bias = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, bias):
        return attention(q, k, v, normalizer, mask=bias, impl="fused")

    assert torch.autograd.gradgradcheck(fn, (q, k, v, bias))


EMPTY = {"batch 0": (0, 5, 6), "queries 0": (2, 0, 6), "keys 0": (2, 5, 0)}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize(
    ("impl", "norm"),
    [
        ("auto", "multimax2"),
        ("auto", "softmax"),
        ("reference", "multimax2"),
        ("reference", "sparsemax"),
        ("sdpa", "softmax"),
        ("fused", "multimax_v2"),
        ("inference", "multimax2"),
        pytest.param("flex", "multimax2", marks=needs_flex),
    ],
)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "causal"])
def test_inputs_without_scores_give_the_empty_or_zero_output_with_gradients(
    case, impl, norm, mask_kind
):
    """A batch of 0, queries of length 0 or keys of length 0: the output has the right shape
    (zeros for queries without keys, as for fully masked rows) and every gradient is there,
    zero; forward-only paths run without gradients."""
    b, n, m = EMPTY[case]
    grads = impl not in ("inference", "flex")
    normalizer = NORMALIZERS[norm]() if norm in NORMALIZERS else build_normalizer(norm)
    q, k, v = (torch.randn(b, 3, length, 4, requires_grad=grads) for length in (n, m, m))
    mask = torch.ones(b, 1, n, m, dtype=torch.bool) if mask_kind == "bool" else None
    with torch.set_grad_enabled(grads):
        out = attention(q, k, v, normalizer, mask=mask, is_causal=mask_kind == "causal", impl=impl)
    assert out.shape == (b, 3, n, 4)
    assert (out == 0).all()
    if grads:
        out.sum().backward()
        for t in (q, k, v, *normalizer.parameters()):
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


FINITE_FILLS = [
    (torch.float32, -1e8),  # fairseq's encoder attn_mask fill
    (torch.float32, torch.finfo(torch.float32).min),  # Hugging Face's
    (torch.float16, -1e4),  # fairseq's fill in half precision
    (torch.float16, torch.finfo(torch.float16).min),
    (torch.bfloat16, -1e4),  # rounds to -9984 in bfloat16
    (torch.bfloat16, torch.finfo(torch.bfloat16).min),
]


@pytest.mark.parametrize(("dtype", "fill"), FINITE_FILLS, ids=lambda x: str(x))
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_large_finite_negative_mask_entries_count_as_masked(dtype, fill, impl):
    """evsoftmax's row mean (and every normaliser) treats fairseq's −1e8 / −1e4 and
    finfo.min fills exactly as a boolean mask."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, :, :, 3:] = False
    keep[1, :, :, 1] = False
    additive = torch.zeros(2, 1, 5, 5, dtype=dtype).masked_fill(~keep, fill)
    for name in ("evsoftmax", "softmax", "sparsemax", "multimax"):
        normalizer = build_normalizer(name).eval()
        want = attention(q, k, v, normalizer, mask=keep, impl="reference")
        got = attention(q, k, v, normalizer, mask=additive, impl=impl)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=name)
    mask = torch.tensor([0.0, -3.0, fill, float("-inf")], dtype=dtype)
    keep_split, bias = split_mask(mask, torch.float32)
    assert keep_split.tolist() == [True, True, False, False]
    assert bias.tolist() == [0.0, -3.0, 0.0, 0.0]


# --- issue 14: tiles instead of an N×M tensor ----------------------------------------------


def masks4(n, m):
    """``masks`` for a batch of 4 (the padding mask's two lengths, twice)."""
    out = masks(4, n, m)
    padding, causal = out["causal+padding"]
    out["causal+padding"] = (padding.repeat(2, 1, 1, 1), causal)
    return out


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few scores, so small inputs run as many tiles (rows and batch items)."""

    def set_tiles(scores: int, causal_rows: int = 3) -> None:
        monkeypatch.setattr(multimax.fused, "SLICE_SCORES", scores)
        monkeypatch.setattr(multimax.fused, "CAUSAL_TILE_ROWS", causal_rows)
        monkeypatch.setattr(multimax.fused, "MIN_TILE_ROWS", 1)

    return set_tiles


@pytest.mark.parametrize("norm", ["multimax2", "multimax1", "multimax_v2", "softmax_learned"])
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal", "causal+padding"])
@pytest.mark.parametrize("scores", [40, 200])
def test_many_tiles_equal_the_reference(small_tiles, norm, mask_name, scores):
    """Rows split into tiles, batch items grouped (b = 4), causal tiles cut at their last
    row: outputs and gradients of q, k, v and σ, and the no-grad path, equal the reference."""
    small_tiles(scores)
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(b=4, n=9, m=9 if "causal" in mask_name else 11)
    mask, causal = masks4(9, k.shape[2])[mask_name]
    tiles = multimax.fused.attention_tiles(q, k, v, causal)
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
        covered = {i for t in multimax.fused.attention_tiles(q, k, v, True) for i in
                   range(t.rows.start, t.rows.stop)}  # fmt: skip
        assert min(covered) > 0  # a tile holding only rows without keys is skipped


def test_causal_tiles_skip_the_keys_above_the_diagonal():
    """Each causal tile reads only the keys up to its last row: about half the scores (plus
    the tiles' own triangles) are ever computed."""
    q = k = v = torch.empty(2, 8, 1024, 64)
    tiles = multimax.fused.attention_tiles(q, k, v, causal=True)
    long = multimax.fused.attention_tiles(*(torch.empty(1, 8, 8192, 64),) * 3, causal=False)
    assert min(t.rows.stop - t.rows.start for t in long) >= multimax.fused.MIN_TILE_ROWS
    assert all(t.keys == t.rows.stop for t in tiles)
    rows = multimax.fused.CAUSAL_TILE_ROWS
    assert max(t.rows.stop - t.rows.start for t in tiles) <= rows
    computed = sum((t.rows.stop - t.rows.start) * t.keys for t in tiles)
    assert computed <= 1024 * (1024 + rows) / 2
    full = multimax.fused.attention_tiles(q, k, v, causal=False)
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
    for tile in multimax.fused.attention_tiles(q, k, v, True):
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
    from experiments.benchmark import peak_bytes

    small_tiles(1 << 12, causal_rows=16)
    normalizer = NORMALIZERS["multimax2"]()
    q, k, v = (torch.randn(1, 2, 512, 16, requires_grad=True) for _ in range(3))
    score_bytes = 2 * 512 * 512 * 4

    def run(impl):
        def call():
            attention(q, k, v, normalizer, is_causal=True, impl=impl).sum().backward()

        return call

    fused = peak_bytes(run("fused"), torch.device("cpu"))
    reference = peak_bytes(run("reference"), torch.device("cpu"))
    assert fused < score_bytes / 4 < 3 * score_bytes < reference

    def infer():
        with torch.no_grad():
            attention(q, k, v, normalizer, is_causal=True, impl="inference")

    assert peak_bytes(infer, torch.device("cpu")) < score_bytes / 4


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

"""The fused path (σ + softmax with its own backward) and the inference path equal the
reference: outputs, and gradients of q, k, v, the σ parameters and an additive mask, with
masks, causality, empty rows, dropout, half precision and second derivatives; the fused path
keeps nothing N×M for the backward."""

import math

import pytest
import torch
from attention_cases import (
    NORMALIZERS,
    ROW_MAPS,
    assert_same,
    fast_and_reference,
    inputs,
    masks,
    run_with_grads,
)

import multimax
from multimax import attention
from multimax.attention import split_mask
from multimax.fused import fused_attention


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


@pytest.mark.parametrize("norm", ["multimax2", "multimax3", "multimax_v2", *ROW_MAPS[::2]])
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal"])
def test_inference_path_equals_reference_without_grad(norm, mask_name):
    normalizer = NORMALIZERS[norm]()
    q, k, v = inputs(n=7)
    mask, causal = masks(2, 7, 7)[mask_name]
    with torch.no_grad():
        ref = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="reference")
        fast = attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="inference")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def _saved_sizes(fn):
    """Sizes of the distinct tensors autograd keeps for backward."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(sizes.values())


@pytest.mark.parametrize("norm", ["multimax2", "softmax_sink", "sigmoid", "softpick"])
def test_fused_saves_no_score_tensor_for_backward(norm):
    """Eager softmax attention keeps its N×M weights for backward, the reference at least as
    much; the tiled path keeps q, k, v and two numbers per query row, nothing N×M."""
    q, k, v = inputs(n=16, d=4)
    scores = 2 * 3 * 16 * 16
    eager = _saved_sizes(lambda: torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v)
    fused = _saved_sizes(lambda: attention(q, k, v, NORMALIZERS[norm](), impl="fused"))
    reference = _saved_sizes(lambda: attention(q, k, v, NORMALIZERS[norm](), impl="reference"))
    count = lambda sizes: sum(s >= scores for s in sizes)  # noqa: E731
    assert count(eager) == 1 and count(reference) >= 1
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


@pytest.mark.parametrize(
    "norm",
    # The row maps' compiles take ~20 s each here: -m slow (their eager kernels are above).
    ["multimax2", "multimax3", "multimax_v2"]
    + [pytest.param(name, marks=pytest.mark.slow) for name in ROW_MAPS[::2]],
)
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


@pytest.mark.parametrize(
    "norm", ["multimax1", "multimax2", "multimax3", "multimax_v2", *ROW_MAPS[::2]]
)
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


@pytest.mark.parametrize(
    "norm", ["multimax2", "multimax3", "multimax_v2", "softmax_learned", *ROW_MAPS[::2]]
)
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

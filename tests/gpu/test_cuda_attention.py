"""Attention paths on CUDA: the automatic choice there (SDPA for softmax, FlexAttention for
σ normalisers), FlexAttention's gradients and the compiled fused kernels equal the reference."""

import pytest
import torch
from unit.attention_cases import (
    NORMALIZERS,
    ROW_MAPS,
    SSMAX,
    assert_same,
    fast_and_reference,
    inputs,
    masks,
    needs_flex,
    run_with_grads,
)

from multimax import attention, build_normalizer
from multimax.attention import AttentionInputs, select_path, split_mask
from multimax.flex import FLEX_AVAILABLE
from multimax.fused import fused_attention

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


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


@pytest.mark.parametrize("norm", ROW_MAPS[::2])
@pytest.mark.parametrize("mask_name", ["additive", "causal+padding"])
def test_compiled_fused_kernels_equal_reference_on_cuda(norm, mask_name):
    """The tiled Function with compiled kernels for the row maps (sink, sigmoid, softpick),
    outputs and gradients of q, k, v and the normaliser's parameters."""
    normalizer = NORMALIZERS[norm]().cuda()
    q, k, v = inputs(n=40, d=16, device="cuda")
    mask, causal = masks(2, 40, 40)[mask_name]
    mask = None if mask is None else mask.cuda()
    keep, bias = split_mask(mask, torch.float32)
    ref = run_with_grads(
        lambda: attention(q, k, v, normalizer, mask=mask, is_causal=causal, impl="reference"),
        q,
        k,
        v,
        normalizer,
    )
    fast = run_with_grads(
        lambda: fused_attention(
            q, k, v, normalizer, keep, bias, scale=0.25, compiled=True, is_causal=causal
        ),
        q,
        k,
        v,
        normalizer,
    )
    assert_same(fast, ref, tol=1e-4)


@pytest.mark.parametrize("norm", list(SSMAX))
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal+padding"])
def test_sdpa_ssmax_equals_reference_on_cuda(norm, mask_name):
    normalizer = SSMAX[norm]().cuda()
    q, k, v = inputs(n=40, d=16, device="cuda")
    mask, causal = masks(2, 40, 40)[mask_name]
    mask = None if mask is None else mask.cuda()
    fast, ref = fast_and_reference("sdpa", q, k, v, normalizer, mask, causal)
    assert_same(fast, ref, tol=1e-4)

"""FlexAttention with σ as its score_mod equals the reference (forward on this device)."""

import math

import pytest
import torch
from attention_cases import NORMALIZERS, inputs, masks, needs_flex

from multimax import attention
from multimax.flex import flex_sigma_attention


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

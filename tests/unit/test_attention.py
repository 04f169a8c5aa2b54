"""Reference attention: SDPA equality for softmax, σ before masks, masks, empty rows."""

import math

import pytest
import torch
import torch.nn.functional as F

import multimax
from multimax import attention, attention_with_weights, build_normalizer


def qkv(b=2, h=3, n=7, m=None, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = n if m is None else m
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, m, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, m, d, generator=g, dtype=dtype)
    return q, k, v


def explicit(q, k, v, normalizer, keep=None, bias=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return normalizer(scores, mask=keep, bias=bias) @ v


def padding_mask(b, m, lengths):
    return (torch.arange(m)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_uses_sdpa_and_equals_reference(causal):
    q, k, v = qkv()
    fast = attention(q, k, v, "softmax", is_causal=causal)
    ref = attention(q, k, v, "softmax", is_causal=causal, impl="reference")
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(fast, sdpa)
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)


def test_softmax_with_bool_and_additive_masks_equals_sdpa():
    q, k, v = qkv(n=6, m=9)
    keep = padding_mask(2, 9, [9, 5])
    torch.testing.assert_close(
        attention(q, k, v, None, mask=keep), F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    )
    bias = torch.randn(6, 9)
    torch.testing.assert_close(
        attention(q, k, v, None, mask=bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    )
    torch.testing.assert_close(
        attention(q, k, v, None, mask=bias, impl="reference"),
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
        atol=1e-5,
        rtol=1e-5,
    )


def test_softmax_temperature_goes_through_sdpa():
    q, k, v = qkv()
    n = build_normalizer("softmax", temperature=0.5)
    torch.testing.assert_close(
        attention(q, k, v, n), attention(q, k, v, n, impl="reference"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", list(multimax.NORMALIZERS))
def test_every_normalizer_masks_and_empty_rows(name):
    q, k, v = qkv(b=2, n=5, m=6)
    keep = padding_mask(2, 6, [6, 0])  # second sequence has no valid key at all
    normalizer = build_normalizer(name)
    causal = normalizer.causal_only  # stick-breaking: causal attention only
    out, weights = attention_with_weights(q, k, v, normalizer, mask=keep, is_causal=causal)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (weights[1] == 0).all()
    if normalizer.output_refusal is None and name != "softmax_sink":  # rows are distributions
        assert (weights[0].sum(-1) - 1).abs().max() < 1e-5
    torch.testing.assert_close(attention(q, k, v, normalizer, mask=keep, is_causal=causal), out)


@pytest.mark.parametrize("name", list(multimax.NORMALIZERS))
def test_causal_masking_for_every_normalizer(name):
    q, k, v = qkv(n=5)
    _, weights = attention_with_weights(q, k, v, name, is_causal=True)
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (weights[..., future] == 0).all()
    # with a KV cache: one new query sees every cached key
    _, w_step = attention_with_weights(q[:, :, -1:], k, v, name, is_causal=True)
    assert (w_step > 0).any(-1).all()


def test_sigma_is_applied_before_the_additive_mask():
    q, k, v = qkv()
    m = multimax.MultiMax(order=2)
    with torch.no_grad():
        m.low_coef.fill_(-1.0)
        m.high_coef.fill_(-0.4)
    bias = torch.randn(7, 7)
    bias[0, 3] = float("-inf")
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    expected = torch.softmax(m.modulate(scores) + bias, -1) @ v
    torch.testing.assert_close(attention(q, k, v, m, mask=bias), expected, atol=1e-5, rtol=1e-5)
    wrong = torch.softmax(m.modulate(scores + bias.clamp_min(-1e4)), -1) @ v
    assert not torch.allclose(attention(q, k, v, m, mask=bias), wrong, atol=1e-3)


def test_half_precision_and_gradients_reach_sigma():
    q, k, v = qkv(dtype=torch.bfloat16)
    m = multimax.MultiMax(order=2)
    out = attention(q, k, v, m, is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    q, k, v = (t.float().requires_grad_() for t in qkv())
    attention(q, k, v, m, is_causal=True).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_dropout_only_when_asked():
    q, k, v = qkv()
    torch.manual_seed(0)
    torch.testing.assert_close(
        attention(q, k, v, "sparsemax", dropout_p=0.0), attention(q, k, v, "sparsemax")
    )
    a = attention(q, k, v, "sparsemax", dropout_p=0.5)
    assert not torch.allclose(a, attention(q, k, v, "sparsemax"))


def test_forcing_an_impossible_path_names_the_possible_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="paths that can: .*reference"):
        attention(q, k, v, "sparsemax", impl="sdpa")
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, "softmax", impl="warp-drive")


def test_record_attention_collects_real_weights():
    q, k, v = qkv()
    m = multimax.MultiMax()
    with multimax.record_attention() as weights:
        out1 = attention(q, k, v, m, is_causal=True)
        attention(q, k, v, "softmax")
    assert len(weights) == 2
    torch.testing.assert_close(out1, weights[0] @ v)
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(2, 3, 7))
    attention(q, k, v, m)
    assert len(weights) == 2  # recording stops with the block

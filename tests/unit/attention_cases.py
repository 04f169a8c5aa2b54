"""Shared cases for the attention-path tests: normalisers far from softmax, inputs, masks
(with rows whose keys are all masked), and the comparison of a path with the reference."""

import pytest
import torch

from multimax import attention, build_normalizer
from multimax.flex import FLEX_AVAILABLE

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
    # Row maps without σ (multimax.row_maps): the fused path runs them, FlexAttention does not.
    "softmax_sink": lambda: strong("softmax_sink", num_heads=3),
    "softmax_sink_shared": lambda: strong("softmax_sink"),
    "sigmoid": lambda: build_normalizer("sigmoid"),
    "sigmoid_fixed_bias": lambda: build_normalizer("sigmoid", logit_bias=-1.5),
    "softpick": lambda: build_normalizer("softpick"),
}
ROW_MAPS = ["softmax_sink", "softmax_sink_shared", "sigmoid", "sigmoid_fixed_bias", "softpick"]
# Scalable-Softmax runs on SDPA, its per-row factor s·log n folded into q (3 heads, as inputs()).
SSMAX = {"ssmax": lambda: strong("ssmax", num_heads=3), "ssmax_shared": lambda: strong("ssmax")}


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


def masks4(n, m):
    """``masks`` for a batch of 4 (the padding mask's two lengths, twice)."""
    out = masks(4, n, m)
    padding, causal = out["causal+padding"]
    out["causal+padding"] = (padding.repeat(2, 1, 1, 1), causal)
    return out


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

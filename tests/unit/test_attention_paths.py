"""Which path ``attention`` takes and what every path promises wherever it is chosen: the
auto order and rules, forcing a path, SDPA for fixed-temperature softmax, autocast, inputs
without any score, and large finite negative mask entries counted as masked."""

import math

import pytest
import torch
from attention_cases import (
    NORMALIZERS,
    ROW_MAPS,
    SSMAX,
    assert_same,
    fast_and_reference,
    inputs,
    masks,
    needs_flex,
)

from multimax import attention, build_normalizer
from multimax.attention import (
    ATTENTION_PATHS,
    AttentionInputs,
    select_path,
    split_mask,
    use_attention_impl,
)
from multimax.compile_policy import set_compile_policy

CUDA = torch.cuda.is_available()


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


@pytest.mark.parametrize("policy", ["auto", "always"])
def test_auto_selection_for_the_normalisers_of_2025(policy):
    """SSMax takes SDPA at any size; the row maps (sink, sigmoid, softpick) take the tiled
    paths when their kernels compile, like MultiMax; α-entmax and stick-breaking have only
    the reference."""
    q, k, v = inputs()
    expected = {
        "ssmax": "sdpa",
        "ssmax_shared": "sdpa",
        "entmax_alpha": "reference",
        "stickbreaking": "reference",
        **{name: "fused" if policy == "always" else "reference" for name in ROW_MAPS},
    }
    builders = {**NORMALIZERS, **SSMAX}
    previous = set_compile_policy(policy)
    try:
        for name, path in expected.items():
            normalizer = builders[name]() if name in builders else build_normalizer(name)
            causal = normalizer.causal_only
            probe = AttentionInputs(q, k, v, normalizer, None, None, causal, 0.0, 0.3)
            assert select_path(probe) == path, name
            if path == "fused":
                with torch.no_grad():
                    assert select_path(probe) == "inference", name
    finally:
        set_compile_policy(previous)


@pytest.mark.parametrize("norm", list(SSMAX))
@pytest.mark.parametrize("mask_name", ["none", "bool", "additive", "causal", "causal+padding"])
def test_sdpa_runs_ssmax_with_its_factor_folded_into_q(norm, mask_name):
    """softmax(s·log n·x + bias) with n each row's unmasked keys (causal included): SDPA on
    q·(scale·s_h·log n) equals the reference in outputs and the gradients of q, k, v and s;
    a row without keys gives zeros."""
    normalizer = SSMAX[norm]()
    q, k, v = inputs(n=7, m=11 if mask_name != "causal+padding" else 7)
    mask, causal = masks(2, q.shape[2], k.shape[2])[mask_name]
    fast, ref = fast_and_reference("sdpa", q, k, v, normalizer, mask, causal)
    # s's gradient sums terms of size ~20 to ~0.02: q·(s·log n) rounds before the product.
    assert_same(fast, ref, tol=1e-4)
    if mask_name == "bool":
        assert fast[0][0, 0, 1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sdpa_ssmax_in_half_precision_returns_the_input_dtype(dtype):
    """Half-precision q, k, v: SDPA runs in the input dtype, as it does for softmax (q·s·log n
    and dq rounded to it), so its output and gradients (s's a sum of ~10² such dq terms)
    stay within a few roundings (8 ε of the largest entry) of the reference."""
    normalizer = SSMAX["ssmax"]()
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs(n=7, m=9))
    mask, _ = masks(2, 7, 9)["bool"]
    fast, ref = fast_and_reference("sdpa", q, k, v, normalizer, mask, False)
    assert fast[0].dtype == ref[0].dtype == dtype
    eps = torch.finfo(dtype).eps
    for got, want in zip([fast[0], *fast[1]], [ref[0], *ref[1]], strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=8 * eps * scale, rtol=0)


def test_forcing_a_path_that_cannot_run_names_those_that_can():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"'fused'.*paths that can: reference"):
        attention(q, k, v, "sparsemax", impl="fused")
    if not CUDA:
        with pytest.raises(ValueError, match=r"'flex'.*paths that can: fused, reference"):
            attention(q, k, v, NORMALIZERS["multimax2"](), impl="flex")
    with pytest.raises(ValueError, match="valid: auto, sdpa, flex"):
        attention(q, k, v, "softmax", impl="triton")


def test_inference_path_refuses_when_gradients_are_needed():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="paths that can: .*fused.*reference"):
        attention(q, k, v, NORMALIZERS["multimax2"](), impl="inference")


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
        ("fused", "softmax_sink"),
        ("fused", "softpick"),
        ("sdpa", "ssmax"),
        ("inference", "multimax2"),
        pytest.param("flex", "multimax2", marks=needs_flex),
    ],
)
def test_every_path_runs_forward_and_backward_under_cpu_bf16_autocast(impl, norm):
    """fp32 q, k, v under bf16 autocast: the products run in bf16 as autocast runs them and
    the path agrees with the reference under the same autocast (forward-only paths: no grad)."""
    grads = impl not in ("inference", "flex")
    normalizer = {**NORMALIZERS, **SSMAX}[norm]()
    out, got = _cpu_autocast_run(impl, normalizer, grads)
    ref, want = _cpu_autocast_run("reference", normalizer, grads)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, atol=3e-2 * w.abs().max().item() + 1e-3, rtol=0)


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
        ("fused", "softmax_sink"),
        ("sdpa", "ssmax"),
        ("inference", "multimax2"),
        ("inference", "softpick"),
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
    builders = {**NORMALIZERS, **SSMAX}
    normalizer = builders[norm]() if norm in builders else build_normalizer(norm)
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

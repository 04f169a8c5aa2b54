"""On CUDA, ``impl="auto"`` trains every normaliser on the path the project promises (stock
softmax and SSMax on SDPA, σ normalisers on FlexAttention, the row maps (sink, sigmoid,
softpick) on the compiled tiled Function) and agrees with the reference there (float32, a
padded batch, outputs and the gradients of q, k, v and the normaliser's parameters), at the
DeiT-small attention shape."""

import pytest
import torch

import multimax
from multimax.attention import AttentionInputs, select_path
from multimax.normalizers import Softmax, SSMax
from multimax.row_maps import fused_spec
from multimax.sigma import pointwise_sigma

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEIT_SMALL = (2, 6, 197, 64)  # (B, H, N, D)
DEIT_SMALL_BATCH16 = (16, 6, 197, 64)  # the benchmark's: large enough for compiled kernels
BUILDS = {name: {"name": name} for name in multimax.NORMALIZERS}
BUILDS["softmax_learned_T"] = {"name": "softmax", "learn_temperature": True}


def build(name: str, device: str) -> multimax.Normalizer:
    options = dict(BUILDS[name])
    return multimax.build_normalizer(options.pop("name"), **options).to(device)


def promised_path(normalizer: multimax.Normalizer) -> str | None:
    """Stock softmax and SSMax on SDPA, σ normalisers on FlexAttention, the other row maps on
    the tiled Function (where its kernels compile); None where nothing is promised."""
    if isinstance(normalizer, Softmax) and not normalizer.learn_temperature:
        return "sdpa"
    if isinstance(normalizer, SSMax):
        return "sdpa"
    if pointwise_sigma(normalizer) is not None:
        return "flex"
    if fused_spec(normalizer) is not None:
        return "fused"
    return None


def training_path(normalizer, device: str, shape=DEIT_SMALL_BATCH16) -> str:
    b, h, n, d = shape
    q, k, v = (
        torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16).requires_grad_()
        for _ in range(3)
    )
    causal = normalizer.causal_only
    return select_path(AttentionInputs(q, k, v, normalizer, None, None, causal, 0.0, d**-0.5))


def auto_against_reference(normalizer, device: str, shape=DEIT_SMALL) -> tuple[float, float]:
    """(largest |auto − reference| over the output and the gradients, largest |reference|)."""
    torch.manual_seed(0)
    b, h, n, d = shape
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
    keep[-1, ..., 3 * n // 4 :] = False  # the last sequence is padded
    qkv = [torch.randn(b, h, n, d, device=device).requires_grad_() for _ in range(3)]
    results = {}
    for impl in ("auto", "reference"):
        out = multimax.attention(
            *qkv, normalizer, mask=keep, is_causal=normalizer.causal_only, impl=impl
        )
        wanted = [*qkv, *normalizer.parameters()]
        results[impl] = (out, *torch.autograd.grad(out.square().sum(), wanted))
    error = max((a - r).abs().max().item() for a, r in zip(*results.values(), strict=True))
    return error, max(r.abs().max().item() for r in results["reference"])


@pytest.mark.parametrize("name", BUILDS)
def test_auto_trains_each_normaliser_on_its_promised_path(name):
    normalizer = build(name, "cuda")
    promised = promised_path(normalizer)
    if promised is None:
        pytest.skip(f"nothing is promised for {name}")
    with torch.enable_grad():
        assert training_path(normalizer, "cuda") == promised


@pytest.mark.parametrize("name", BUILDS)
def test_auto_equals_the_reference_for_each_normaliser(name):
    error, scale = auto_against_reference(build(name, "cuda"), "cuda")
    assert error <= 1e-3 * max(scale, 1.0), f"{name}: auto differs by {error:.2e} (of {scale:.1e})"


@pytest.mark.parametrize("name", [n for n in BUILDS if promised_path(build(n, "cpu")) == "fused"])
def test_auto_equals_the_reference_where_the_row_maps_compile(name):
    """At the benchmark's batch the row maps (sink, sigmoid, softpick) run the compiled tiled
    Function: it agrees with the reference too."""
    normalizer = build(name, "cuda")
    assert training_path(normalizer, "cuda") == "fused"
    error, scale = auto_against_reference(normalizer, "cuda", DEIT_SMALL_BATCH16)
    assert error <= 1e-3 * max(scale, 1.0), f"{name}: auto differs by {error:.2e} (of {scale:.1e})"

"""How σ's scalars start: ``trunc_normal`` (cut at ±2·std), ``trunc_normal_timm`` (timm's call,
cut at ±2 absolute: the authors' code) and ``zeros`` (σ = identity), on MultiMax and per layer
kind in the timm DeiT, with the authors' qkv projection without bias."""

from __future__ import annotations

import pytest
import timm
import torch

import multimax.integrations.timm  # noqa: F401 - registers the DeiT-GAP models
from multimax import MultiMax, build_normalizer
from multimax.modulation import SIGMA_INITS, MultiMaxV2, init_sigma_


def _scalars(normalizer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in normalizer.sigma_parameters()])


def test_each_kind_draws_what_it_names():
    torch.manual_seed(0)
    many = 5000  # order 5000: 20,000 scalars, enough to see the tails
    cut = _scalars(MultiMax(order=many, init="trunc_normal"))
    assert cut.abs().max() <= 0.04 and 0.015 < cut.std() < 0.02  # cut at ±2·std
    timm_like = _scalars(MultiMax(order=many, init="trunc_normal_timm"))
    assert timm_like.abs().max() > 0.05 and timm_like.std() == pytest.approx(0.02, rel=0.05)
    zeros = MultiMax(order=2, init="zeros")
    assert torch.count_nonzero(_scalars(zeros)) == 0
    x = torch.randn(3, 7)
    assert torch.equal(zeros.modulate(x), x)  # σ = identity: MultiMax is SoftMax at step 0
    wide = _scalars(MultiMax(order=many, init="trunc_normal", init_std=0.5))
    assert wide.abs().max() <= 1.0 and wide.std() > 0.3


def test_reinitialising_keeps_v2_affine_identity_and_refuses_unknown_kinds():
    v2 = MultiMaxV2(init="zeros")
    init_sigma_(v2, "trunc_normal_timm")
    assert torch.count_nonzero(_scalars(v2)) == 4
    assert v2.affine_scale.item() == 1.0 and v2.affine_shift.item() == 0.0
    softmax = build_normalizer("softmax")
    init_sigma_(softmax, "zeros")  # no σ: nothing to do
    with pytest.raises(ValueError, match="valid: " + ", ".join(SIGMA_INITS)):
        MultiMax(init="normal")
    with pytest.raises(ValueError, match="trunc_normal_timm"):
        init_sigma_(v2, "uniform")


def test_deit_sigma_init_per_layer_kind_and_qkv_without_bias():
    model = timm.create_model(
        "deit_smoke_gap_patch4_16",
        normalizer="multimax",
        qkv_bias=False,
        sigma_init={"attention": {"kind": "zeros"}, "output": {"kind": "trunc_normal_timm"}},
    )
    assert not any(k.endswith("qkv.bias") for k in model.state_dict())
    for block in model.blocks:
        assert block.attn.qkv.bias is None
        assert torch.count_nonzero(_scalars(block.attn.normalizer)) == 0
    assert torch.count_nonzero(_scalars(model.output_normalizer)) == 8
    stock = timm.create_model("deit_smoke_gap_patch4_16", normalizer="multimax")
    assert all(block.attn.qkv.bias is not None for block in stock.blocks)
    assert all(torch.count_nonzero(_scalars(b.attn.normalizer)) == 8 for b in stock.blocks)
    # a normaliser without σ ignores the setting
    softmax = timm.create_model(
        "deit_smoke_gap_patch4_16",
        normalizer="softmax",
        sigma_init={"attention": {"kind": "zeros"}},
    )
    assert sum(p.numel() for n, p in softmax.named_parameters() if "normalizer" in n) == 0

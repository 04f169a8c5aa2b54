"""The registered DeiT-GAP timm models: timm's weights and logits with softmax, 4·K more
scalars per normalised layer with MultiMax, every normaliser selectable, losses for soft
targets, no weight decay where there should be none."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import multimax
from multimax.integrations.timm import MODEL_NAMES, GapVisionTransformer

SIZES = {
    "deit_tiny_gap_patch16_224": {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3},
    "deit_small_gap_patch16_224": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6},
    "deit_smoke_gap_patch4_16": {
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 4,
        "num_heads": 4,
        "num_classes": 10,
    },
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_models_are_registered_with_timm():
    for name in MODEL_NAMES:
        assert name in timm.list_models("deit_*_gap_*")


@pytest.mark.parametrize(
    "name",
    [
        "deit_smoke_gap_patch4_16",
        "deit_tiny_gap_patch16_224",
        pytest.param("deit_small_gap_patch16_224", marks=pytest.mark.slow),
    ],
)
def test_softmax_model_is_timms_vision_transformer(name):
    torch.manual_seed(0)
    ours = timm.create_model(name, normalizer="softmax", output_normalizer="softmax").eval()
    theirs = VisionTransformer(
        class_token=False, global_pool="avg", fc_norm=False, **SIZES[name]
    ).eval()
    assert n_params(ours) == n_params(theirs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, *ours.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
    assert isinstance(ours.norm, torch.nn.LayerNorm) and isinstance(ours.fc_norm, torch.nn.Identity)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_multimax_adds_4k_scalars_per_layer_and_output(name, order):
    with torch.device("meta"):  # counting only: skip the weight initialisation
        base = timm.create_model(name, normalizer="softmax")
        mm = timm.create_model(name, normalizer="multimax", normalizer_options={"order": order})
        # only the attention-layer normalisers when the output layer stays softmax
        mixed = timm.create_model(
            name,
            normalizer="multimax",
            normalizer_options={"order": order},
            output_normalizer="softmax",
        )
    depth = SIZES[name]["depth"]
    assert n_params(mm) - n_params(base) == 4 * order * (depth + 1)
    assert n_params(mixed) - n_params(base) == 4 * order * depth
    assert isinstance(mm.output_normalizer, multimax.MultiMax)
    sigmas = [m for m in mm.modules() if isinstance(m, multimax.MultiMax)]
    assert len({id(s.low_threshold) for s in sigmas}) == depth + 1  # one σ per layer


@pytest.mark.parametrize(
    "normalizer, options",
    [
        ("sparsemax", {}),
        ("entmax15", {}),
        ("evsoftmax", {}),
        ("softmax", {"learn_temperature": True}),
        ("multimax", {"order": 1}),
    ],
)
def test_every_normalizer_trains_and_predicts_a_distribution(normalizer, options):
    torch.manual_seed(0)
    model = timm.create_model(
        "deit_smoke_gap_patch4_16", normalizer=normalizer, normalizer_options=options
    )
    assert type(model.output_normalizer).registry_name == normalizer
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss = multimax.build_loss(model.output_normalizer, label_smoothing=0.1)(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    # σ / temperature parameters of attention and output get gradients
    for module in model.modules():
        if isinstance(module, multimax.Normalizer):
            for p in module.parameters():
                assert p.grad is not None
    model.eval()
    with torch.no_grad():
        p = model.predict_proba(x)
    torch.testing.assert_close(p.sum(-1), torch.ones(4))
    assert model.attention_paths()


def test_attention_impl_is_passed_through_and_paths_agree():
    torch.manual_seed(0)
    auto = timm.create_model("deit_smoke_gap_patch4_16", normalizer="multimax").eval()
    ref = timm.create_model(
        "deit_smoke_gap_patch4_16", normalizer="multimax", attention_impl="reference"
    ).eval()
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), ref(x), rtol=1e-4, atol=1e-5)
    assert ref.attention_paths() == ["reference"]
    bad = timm.create_model(
        "deit_smoke_gap_patch4_16", normalizer="multimax", attention_impl="sdpa"
    )
    with pytest.raises(ValueError, match="cannot run"):
        bad(x)


def test_record_attention_sees_every_layer():
    model = timm.create_model("deit_smoke_gap_patch4_16", normalizer="sparsemax").eval()
    with torch.no_grad(), multimax.record_attention() as weights:
        model(torch.randn(2, 3, 16, 16))
    assert len(weights) == 4
    assert weights[0].shape == (2, 4, 16, 16)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, 16))


def test_ranking_scores_order_classes_as_the_predictive_distribution():
    torch.manual_seed(0)
    model = timm.create_model("deit_smoke_gap_patch4_16", normalizer="multimax").eval()
    with torch.no_grad():
        for p in model.output_normalizer.parameters():
            p.uniform_(-0.5, 0.5)
        logits = torch.randn(16, 10) * 3
        probs = model.output_normalizer(logits)
        scores = model.ranking_scores(logits)
    assert torch.equal(probs.argmax(-1), scores.argmax(-1))


@pytest.mark.parametrize("normalizer", ["softmax", "multimax", "sparsemax", "entmax15"])
def test_soft_target_loss_matches_build_loss_on_one_hot_targets(normalizer):
    torch.manual_seed(0)
    norm = multimax.build_normalizer(normalizer)
    logits = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    hard = multimax.build_loss(norm)(logits, target)
    soft = multimax.build_loss(norm)(logits, torch.nn.functional.one_hot(target, 5).float())
    torch.testing.assert_close(soft, hard, rtol=1e-5, atol=1e-6)
    (g_hard,) = torch.autograd.grad(hard, logits)
    (g_soft,) = torch.autograd.grad(multimax.build_loss(norm)(logits, torch.eye(5)[target]), logits)
    torch.testing.assert_close(g_soft, g_hard, rtol=1e-5, atol=1e-6)


def test_soft_target_fenchel_young_gradient_is_p_minus_q():
    logits = torch.randn(3, 6, requires_grad=True)
    q = torch.softmax(torch.randn(3, 6), -1)
    loss = multimax.build_loss("sparsemax")(logits, q)
    (grad,) = torch.autograd.grad(loss, logits)
    p = multimax.build_normalizer("sparsemax")(logits.detach())
    torch.testing.assert_close(grad, (p - q) / 3)
    assert loss.item() >= 0


def test_no_weight_decay_on_sigma_biases_norms_and_pos_embed():
    model = timm.create_model("deit_smoke_gap_patch4_16", normalizer="multimax")
    decay, no_decay = multimax.param_groups(model, 0.05, extra_no_decay=model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "pos_embed" in skipped and "output_normalizer.low_coef" in skipped
    assert "blocks.0.attn.normalizer.high_threshold" in skipped
    assert "blocks.0.norm1.weight" in skipped and "head.bias" in skipped
    assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1 and n != "pos_embed"}


def test_pretrained_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("deit_smoke_gap_patch4_16", pretrained=True)


def test_model_class_is_timms():
    model = timm.create_model("deit_smoke_gap_patch4_16")
    assert isinstance(model, GapVisionTransformer) and isinstance(model, VisionTransformer)
    assert model.global_pool == "avg" and not model.has_class_token

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


# --- timm's own model-test categories, on the registered models at small sizes -------------------
# (forward, backward, FX forward / backward, features_only, forward_intermediates, grad
# checkpointing, reset_classifier, pretrained_cfg, pickling), written here for these models.

SMALL = {"img_size": 32, "depth": 4}  # 2×2 patches of 16 pixels, 4 blocks: seconds on a CPU
SMALL_INPUT = (3, 32, 32)
REGISTERED = ["deit_tiny_gap_patch16_224", "deit_small_gap_patch16_224"]


def small_model(name: str, normalizer: str = "multimax", **kwargs) -> GapVisionTransformer:
    torch.manual_seed(0)
    model = timm.create_model(name, normalizer=normalizer, **{**SMALL, **kwargs})
    with torch.no_grad():  # σ away from the identity, so MultiMax is not SoftMax
        for module in model.modules():
            if isinstance(module, multimax.MultiMax):
                for p in module.parameters():
                    p.uniform_(-0.3, 0.3)
    return model


def fx_graph_module(model: torch.nn.Module, train: bool) -> torch.nn.Module:
    """The model traced by torch.fx the way timm's FX feature extraction traces it (timm's
    notrace registries as tracer arguments), returning the model's final node."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import (
        create_feature_extractor,
        get_graph_node_names,
    )

    tracer_kwargs = {
        "leaf_modules": get_notrace_modules(),
        "autowrap_functions": get_notrace_functions(),
        "param_shapes_constant": True,
    }
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    ).train(train)


@pytest.mark.parametrize("normalizer", ["multimax", "softmax", "sparsemax"])
@pytest.mark.parametrize("name", REGISTERED)
def test_fx_traced_forward_equals_the_model(name, normalizer):
    model = small_model(name, normalizer).eval()
    x = torch.randn(2, *SMALL_INPUT)
    with torch.inference_mode():
        expected = model(x)
        (traced,) = fx_graph_module(model, train=False)(x).values()
    assert torch.equal(traced, expected)


def test_fx_tracing_without_timms_registry_keeps_the_dispatch_one_call():
    """torchvision's extractor without timm's tracer arguments traces it too (torch.fx.wrap),
    and nodes inside the attention layer (its projections) stay reachable."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = small_model("deit_tiny_gap_patch16_224").eval()
    extractor = create_feature_extractor(model, ["blocks.1.attn.qkv", "blocks.3"])
    x = torch.randn(1, *SMALL_INPUT)
    with torch.no_grad():
        out = extractor(x)
        assert out["blocks.3"].shape == (1, 4, 192)
        assert out["blocks.1.attn.qkv"].shape == (1, 4, 3 * 192)
        torch.testing.assert_close(model.head(model.norm(out["blocks.3"]).mean(1)), model(x))


def output_layer_loss(model: GapVisionTransformer, logits: torch.Tensor) -> torch.Tensor:
    """The training loss: the output normaliser's σ sits in the loss, not in ``forward``."""
    target = torch.arange(logits.shape[0]) % logits.shape[-1]
    return multimax.build_loss(model.output_normalizer)(logits, target)


@pytest.mark.parametrize("name", REGISTERED)
def test_fx_traced_backward_reaches_every_parameter(name):
    model = small_model(name, num_classes=42).train()
    traced = fx_graph_module(model, train=True)
    (out,) = traced(torch.randn(2, *SMALL_INPUT)).values()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    output_layer_loss(model, out).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.blocks[0].attn.normalizer.low_coef.grad.abs().sum() > 0


@pytest.mark.parametrize("feature_cls", ["getter", "fx"])
@pytest.mark.parametrize("name", REGISTERED)
def test_features_only(name, feature_cls):
    torch.manual_seed(0)
    kwargs = {} if feature_cls == "getter" else {"feature_cls": "fx"}
    model = timm.create_model(name, normalizer="multimax", features_only=True, **SMALL, **kwargs)
    model.eval()
    dim = SIZES[name]["embed_dim"]
    assert model.feature_info.channels() == [dim] * 3  # the last 3 blocks, as timm's ViT
    assert model.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        outputs = model(torch.randn(2, *SMALL_INPUT))
    assert len(outputs) == 3
    for o in outputs:
        # the getter gives NCHW maps, the FX extractor the blocks' raw (B, N, C) tokens
        assert o.shape == ((2, dim, 2, 2) if feature_cls == "getter" else (2, 4, dim))
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("name", REGISTERED)
def test_forward_intermediates_and_grad_checkpointing(name):
    model = small_model(name).eval()
    x = torch.randn(2, *SMALL_INPUT)
    dim = SIZES[name]["embed_dim"]
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == 4 and all(i.shape == (2, dim, 2, 2) for i in intermediates)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        logits = model(x)
    model.set_grad_checkpointing()
    with torch.no_grad():
        final_ckpt, _ = model.forward_intermediates(x, output_fmt="NCHW")
        torch.testing.assert_close(final_ckpt, final, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-5)
    # gradients through checkpointed blocks equal those without checkpointing
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        model(x).square().mean().backward()
        grads.append(model.blocks[1].attn.normalizer.high_coef.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", REGISTERED)
def test_backward_reaches_every_parameter(name):
    model = small_model(name, num_classes=42).train()
    out = model(torch.randn(2, *SMALL_INPUT))
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    output_layer_loss(model, out).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", REGISTERED)
def test_default_cfg_reset_classifier_and_heads(name):
    model = small_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["fixed_input_size"] is True  # a learned position embedding of one grid size
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state
    dim = SIZES[name]["embed_dim"]
    assert model.num_features == model.head_hidden_size == dim
    x = torch.randn(1, *SMALL_INPUT)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape == (1, 4, dim) and pre_logits.shape == (1, dim)
        model.reset_classifier(0)
        assert model.num_classes == 0
        assert torch.equal(model(x), pre_logits)
        model.reset_classifier(7)
        assert model(x).shape == (1, 7)
        headless = small_model(name, num_classes=0).eval()
        assert headless(x).shape == (1, dim)


@pytest.mark.parametrize("name", REGISTERED)
def test_pickle_and_torch_save_round_trip(tmp_path, name):
    import io
    import pickle

    from multimax.integrations.timm import NormalizedAttention

    model = small_model(name).eval()
    x = torch.randn(2, *SMALL_INPUT)
    with torch.no_grad():
        expected = model(x)
    assert type(model.blocks[0].attn) is NormalizedAttention  # importable by its name
    copy = pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for restored in (copy, loaded):
        with torch.no_grad():
            assert torch.equal(restored.eval()(x), expected)
        assert restored.blocks[2].attn.normalizer is not model.blocks[2].attn.normalizer


def test_a_normalizer_instance_is_a_template_copied_per_layer():
    template = multimax.MultiMax(order=2)
    model = timm.create_model("deit_tiny_gap_patch16_224", normalizer=template, **SMALL)
    sigmas = [m for m in model.modules() if isinstance(m, multimax.MultiMax)]
    assert len(sigmas) == 4 + 1 and template not in sigmas
    assert len({id(s.low_coef) for s in sigmas}) == 5
    extra = sum(p.numel() for s in sigmas for p in s.parameters())
    assert extra == 4 * 2 * (4 + 1)  # 40 scalars: one σ per layer and one for the output
    torch.testing.assert_close(sigmas[0].low_coef, template.low_coef)  # copied, not re-drawn
    with pytest.raises(ValueError, match="pass the name instead"):
        timm.create_model(
            "deit_tiny_gap_patch16_224",
            normalizer=template,
            normalizer_options={"order": 1},
            **SMALL,
        )


def test_torchscript_is_refused_with_the_alternatives_named():
    model = small_model("deit_tiny_gap_patch16_224").eval()
    with pytest.raises(RuntimeError, match="torch.compile"):
        torch.jit.script(model)


def test_torch_export_traces_the_model():
    model = small_model("deit_tiny_gap_patch16_224").eval()
    x = torch.randn(2, *SMALL_INPUT)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))

"""The 2024-2025 normalisers inside the real models: timm's DeiT-GAP and the fairseq plugin's
LM and translation models (per-head parameters, causal-only stick-breaking, the output layer
that only a distribution may be)."""

from __future__ import annotations

import pytest
import timm
import torch

import multimax
import multimax.integrations.timm  # noqa: F401  (registers the models)
from tests.integration.test_fairseq_plugin import (
    LM_SIZES,
    MT_SIZES,
    NO_DROPOUT,
    _incremental,
    build,
    lm_data_dir,
    mt_data_dir,
    shifted,
    token_batch,
)

PER_HEAD = {"ssmax": "scale", "softmax_sink": "sink", "entmax_alpha": "alpha"}
ATTENTION_ONLY = ("sigmoid", "softpick")


@pytest.mark.parametrize("name", ["sigmoid", "softpick", "ssmax", "softmax_sink", "entmax_alpha"])
def test_deit_trains_with_each_attention_normalizer(name):
    torch.manual_seed(0)
    model = timm.create_model("deit_smoke_gap_patch4_16", normalizer=name)
    attention = model.blocks[0].attn.normalizer
    assert attention.registry_name == name
    if name in PER_HEAD:
        assert getattr(attention, PER_HEAD[name]).shape == (model.blocks[0].attn.num_heads,)
        assert getattr(model.output_normalizer, PER_HEAD[name]).shape == (1,)
    expected_output = "softmax" if name in ATTENTION_ONLY else name
    assert model.output_normalizer.registry_name == expected_output
    loss_fn = multimax.build_loss(model.output_normalizer, label_smoothing=0.1)
    loss = loss_fn(model(torch.randn(2, 3, 16, 16)), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    no_decay = multimax.no_weight_decay_names(model)
    for key, param in model.named_parameters():
        if ".normalizer." in key or key.startswith("output_normalizer."):
            assert key in no_decay and param.grad is not None and param.grad.abs().sum() > 0, key


def test_deit_refuses_stickbreaking_and_a_non_distribution_output():
    with pytest.raises(ValueError, match=r"^stickbreaking attention is causal only") as err:
        timm.create_model("deit_smoke_gap_patch4_16", normalizer="stickbreaking")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"output_normalizer=sigmoid is refused: .*distribution"):
        timm.create_model("deit_smoke_gap_patch4_16", output_normalizer="sigmoid")


def test_lm_with_stickbreaking_decodes_step_by_step_as_it_trains(tmp_path):
    extra = LM_SIZES + NO_DROPOUT + ["--attn-normalizer", "stickbreaking"]
    model, task, _ = build(
        lm_data_dir(tmp_path), "language_modeling", "multimax_transformer_lm", extra
    )
    assert type(model.decoder.layers[0].self_attn.normalizer).__name__ == "StickBreaking"
    tokens = token_batch(task.dictionary, [9, 7, 5], left_pad=False)
    model.eval()
    with torch.no_grad():
        full = model(tokens)[0]
        steps = _incremental(model, tokens)
    real = tokens.ne(task.dictionary.pad())
    torch.testing.assert_close(steps[real], full[real], atol=1e-5, rtol=1e-5)


def test_translation_with_per_head_sink_decodes_step_by_step(tmp_path):
    extra = MT_SIZES + NO_DROPOUT + ["--attn-normalizer", "softmax_sink"]
    extra += ["--output-normalizer", "softmax_sink"]
    model, task, _ = build(
        mt_data_dir(tmp_path), "translation", "multimax_transformer_iwslt_de_en", extra
    )
    layer = model.decoder.layers[0]
    for attention in (layer.self_attn, layer.encoder_attn, model.encoder.layers[0].self_attn):
        assert attention.normalizer.sink.shape == (4,)
        with torch.no_grad():
            attention.normalizer.sink.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    src = token_batch(task.source_dictionary, [8, 5, 3], left_pad=True, seed=1)
    src_lengths = src.ne(task.source_dictionary.pad()).sum(1)
    tgt = shifted(
        token_batch(task.target_dictionary, [6, 7, 4], left_pad=False, seed=2),
        task.target_dictionary,
    )
    model.eval()
    with torch.no_grad():
        full = model(src, src_lengths, tgt)[0]
        steps = _incremental(model, tgt, model.encoder(src, src_lengths))
    real = tgt.ne(task.target_dictionary.pad())
    torch.testing.assert_close(steps[real], full[real], atol=1e-5, rtol=1e-5)


def test_fairseq_refuses_stickbreaking_in_translation_and_non_distribution_outputs(tmp_path):
    data = mt_data_dir(tmp_path)
    with pytest.raises(ValueError, match=r"^stickbreaking attention is causal only"):
        build(
            data,
            "translation",
            "multimax_transformer_iwslt_de_en",
            MT_SIZES + ["--attn-normalizer", "stickbreaking"],
        )
    with pytest.raises(ValueError, match=r"^--output-normalizer=softpick is refused"):
        build(
            data,
            "translation",
            "multimax_transformer_iwslt_de_en",
            MT_SIZES + ["--output-normalizer", "softpick"],
        )


def test_an_attention_only_normalizer_leaves_the_output_to_softmax_in_the_apps():
    from experiments.core.setup import normalizer_options
    from experiments.pipelines.fairseq.commands import normalizer_flags
    from tests.composition import compose

    cfg = compose("language_model", ["experiment=lm_wikitext103", "normalizer=stickbreaking"])
    assert normalizer_options(cfg, "attention") == ("stickbreaking", {})
    assert normalizer_options(cfg, "output") == ("softmax", {})
    flags = normalizer_flags(cfg)
    assert flags[:4] == ["--attn-normalizer", "stickbreaking", "--output-normalizer", "softmax"]
    cfg = compose("vision", ["experiment=deit_tiny_imagenet", "normalizer=ssmax"])
    assert normalizer_options(cfg, "output") == ("ssmax", {})

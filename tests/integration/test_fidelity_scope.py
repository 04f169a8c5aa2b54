"""Where σ acts in the fairseq plugin (``--attn-normalizer-scope``, ``--incremental-normalizer``)
and how it starts (``--attn-sigma-init`` / ``--output-sigma-init``): the authors' placement,
beam search with a softmax decoder at inference, and the initial values, on real fairseq
models built as ``fairseq-train`` builds them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fairseq import options, tasks
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import multimax.integrations.fairseq_plugin as plugin
from multimax import MultiMax, Softmax

WORDS = [f"w{i}" for i in range(30)]
SIZES = [
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4", "--dropout", "0", "--attention-dropout", "0",
]  # fmt: skip
MULTIMAX = ["--attn-normalizer", "multimax", "--output-normalizer", "multimax"]
AUTHORS = ["--attn-normalizer-scope", "encoder_self,decoder_self", "--incremental-normalizer",
           "softmax", "--attn-sigma-init", "trunc_normal_timm", "--output-sigma-init",
           "trunc_normal_timm"]  # fmt: skip


def build_translation(tmp: Path, extra: list[str], seed: int = 0):
    """(model, task, cfg) for ``multimax_transformer_iwslt_de_en``, parsed as fairseq-train."""
    for lang in ("de", "en"):
        (tmp / f"dict.{lang}.txt").write_text(
            "".join(f"{w} {99 - i}\n" for i, w in enumerate(WORDS))
        )
    argv = [str(tmp), "--task", "translation", "-s", "de", "-t", "en", "--arch",
            "multimax_transformer_iwslt_de_en", "--user-dir", plugin.USER_DIR, *SIZES, *extra]  # fmt: skip
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    return task.build_model(cfg.model), task, cfg


def sigma_keys(model) -> set[str]:
    return {k for k in model.state_dict() if "normalizer" in k}


def test_authors_scope_puts_sigma_in_self_attention_and_output_only(tmp_path):
    model, _, _ = build_translation(tmp_path, MULTIMAX + AUTHORS)
    for layer in model.encoder.layers:
        assert isinstance(layer.self_attn.normalizer, MultiMax)
        assert layer.self_attn.incremental_normalizer is None  # the encoder never decodes
    for layer in model.decoder.layers:
        assert isinstance(layer.self_attn.normalizer, MultiMax)
        assert isinstance(layer.self_attn.incremental_normalizer, Softmax)
        assert type(layer.encoder_attn.normalizer) is Softmax  # cross-attention: never σ
        assert type(layer.encoder_attn.incremental_normalizer) is Softmax
    assert isinstance(model.decoder.output_normalizer, MultiMax)
    # 2 encoder + 2 decoder self-attentions + the output layer, 4 vectors each
    assert len(sigma_keys(model)) == 5 * 4
    assert not any("encoder_attn" in k for k in sigma_keys(model))

    default, _, _ = build_translation(tmp_path, MULTIMAX)  # the paper's text: σ everywhere
    assert len(sigma_keys(default)) == 7 * 4
    assert all(isinstance(m.encoder_attn.normalizer, MultiMax) for m in default.decoder.layers)
    assert all(m.self_attn.incremental_normalizer is None for m in default.decoder.layers)


def _push_sigma(model, seed: int = 1) -> None:
    """σ far from the identity, so that where it acts changes the numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "normalizer" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.6 - 0.8)


def _beam_search(model, task, cfg, src):
    sample = {
        "id": torch.arange(src.size(0)),
        "net_input": {
            "src_tokens": src,
            "src_lengths": src.ne(task.source_dictionary.pad()).sum(1),
        },
    }
    cfg.generation.beam, cfg.generation.max_len_a, cfg.generation.max_len_b = 3, 0, 10
    generator = task.build_generator([model], cfg.generation)
    with torch.no_grad():
        hypos = task.inference_step(generator, [model], sample)
    return [[(h["tokens"].tolist(), float(h["score"])) for h in sentence] for sentence in hypos]


def test_beam_search_with_incremental_softmax_equals_a_softmax_decoder(tmp_path):
    authors, task, cfg = build_translation(tmp_path, MULTIMAX + AUTHORS)
    _push_sigma(authors)
    authors.eval()
    # the reference: the same weights, decoder self-attention plain softmax (no σ there)
    reference, _, _ = build_translation(
        tmp_path, MULTIMAX + ["--attn-normalizer-scope", "encoder_self"]
    )
    loaded = reference.load_state_dict(authors.state_dict(), strict=False)
    assert not loaded.missing_keys
    assert sorted(loaded.unexpected_keys) == sorted(
        k for k in sigma_keys(authors) if ".self_attn." in k and k.startswith("decoder.")
    )
    reference.eval()
    same, _, _ = build_translation(tmp_path, MULTIMAX + AUTHORS[:2])  # σ in decoding too
    same.load_state_dict(authors.state_dict())
    same.eval()

    src = data_utils.collate_tokens(
        [torch.tensor([4 + (i * 7 + j * 3) % 26 for j in range(n)] + [2]) for i, n in
         enumerate((7, 4, 9, 2))], task.source_dictionary.pad(), 2, left_pad=True,
    )  # fmt: skip
    ours, theirs = _beam_search(authors, task, cfg, src), _beam_search(reference, task, cfg, src)
    for sentence_a, sentence_b in zip(ours, theirs, strict=True):
        for (tokens_a, score_a), (tokens_b, score_b) in zip(sentence_a, sentence_b, strict=True):
            assert tokens_a == tokens_b
            assert score_a == pytest.approx(score_b, abs=1e-5)
    with_sigma = _beam_search(same, task, cfg, src)
    scores = [h[1] for s in ours for h in s]
    assert max(abs(a - b) for a, b in zip(scores, [h[1] for s in with_sigma for h in s])) > 1e-3

    # in training (no incremental state) the authors' decoder self-attention does use σ
    tgt = src.flip(1)
    prev = torch.cat([torch.full((4, 1), 2), tgt[:, :-1]], dim=1)
    with torch.no_grad():
        logits_a = authors(src, src.ne(1).sum(1), prev)[0]
        logits_r = reference(src, src.ne(1).sum(1), prev)[0]
    assert not torch.allclose(logits_a, logits_r, atol=1e-3)


@pytest.mark.parametrize("kind", ["trunc_normal", "trunc_normal_timm", "zeros"])
def test_sigma_initialisation_per_layer_kind(tmp_path, kind):
    extra = ["--attn-sigma-init", kind, "--attn-sigma-init-std", "0.5", "--output-sigma-init",
             "zeros"]  # fmt: skip
    model, _, _ = build_translation(tmp_path, MULTIMAX + extra)
    attention = torch.cat(
        [p.detach().flatten() for n, p in model.named_parameters() if "attn.normalizer" in n]
    )
    assert attention.numel() == 6 * 8
    if kind == "zeros":
        assert torch.count_nonzero(attention) == 0
    else:
        assert attention.std() > 0.2  # std 0.5 asked for, not the default 0.02
        if kind == "trunc_normal":
            assert attention.abs().max() <= 1.0  # cut at ±2·std
    for p in model.decoder.output_normalizer.parameters():
        assert torch.count_nonzero(p) == 0


def test_bad_scope_names_the_valid_kinds(tmp_path):
    with pytest.raises(ValueError, match="encoder_self, decoder_self, cross"):
        build_translation(tmp_path, MULTIMAX + ["--attn-normalizer-scope", "encoder"])

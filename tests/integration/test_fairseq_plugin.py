"""The fairseq plugin, in process: registration, stock models untouched, softmax/softmax equal
to fairseq's stock models (training forward, incremental decoding with beam reordering,
attention weights), every normaliser through beam search with padding, output
distributions, criterion, options, checkpoints.

Models are parsed and built through fairseq's own ``options`` / ``tasks`` (as
``fairseq-train`` does) at tiny sizes. The CLI round trips live in
``test_fairseq_plugin_cli.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fairseq import options, tasks
from fairseq.data import data_utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

import multimax.integrations.fairseq_plugin as plugin

WORDS = [f"w{i}" for i in range(40)]
LM_SIZES = [
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-input-dim", "32",
    "--decoder-output-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--decoder-attention-heads", "4", "--tokens-per-sample", "32",
]  # fmt: skip
MT_SIZES = [
    "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "32",
    "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
    "--decoder-attention-heads", "4",
]  # fmt: skip
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0"]


def write_dictionary(path: Path) -> None:
    path.write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)))


def lm_data_dir(tmp: Path) -> Path:
    write_dictionary(tmp / "dict.txt")
    return tmp


def mt_data_dir(tmp: Path) -> Path:
    write_dictionary(tmp / "dict.de.txt")
    write_dictionary(tmp / "dict.en.txt")
    return tmp


def build(data: Path, task: str, arch: str, extra: list[str], seed: int = 0):
    """(model, task, cfg) parsed and built exactly as ``fairseq-train`` does."""
    argv = [str(data), "--task", task, "--arch", arch, "--user-dir", plugin.USER_DIR, *extra]
    if task == "translation":
        argv += ["-s", "de", "-t", "en"]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(args)
    fairseq_task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = fairseq_task.build_model(cfg.model)
    return model, fairseq_task, cfg


def token_batch(dictionary, lengths: list[int], left_pad: bool, seed: int = 0) -> torch.Tensor:
    """(B, max(lengths)) of random words ending in </s>, padded with the dictionary's pad."""
    g = torch.Generator().manual_seed(seed)
    first = dictionary.nspecial
    rows = [
        torch.cat([torch.randint(first, len(dictionary), (n - 1,), generator=g),
                   torch.tensor([dictionary.eos()])])
        for n in lengths
    ]  # fmt: skip
    return data_utils.collate_tokens(rows, dictionary.pad(), dictionary.eos(), left_pad=left_pad)


def shifted(tokens: torch.Tensor, dictionary) -> torch.Tensor:
    """Teacher-forcing decoder input: </s> then the tokens, dropping the last column."""
    start = torch.full((tokens.size(0), 1), dictionary.eos(), dtype=tokens.dtype)
    return torch.cat([start, tokens[:, :-1]], dim=1)


# --- registration and stock models --------------------------------------------------------


def test_architectures_registered_with_prefix():
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    for arch in (
        "multimax_transformer_lm",
        "multimax_transformer_lm_wiki103",
        "multimax_transformer",
        "multimax_transformer_iwslt_de_en",
        "multimax_transformer_wmt_en_de",
    ):
        model = ARCH_MODEL_NAME_REGISTRY[arch]
        assert model in ("multimax_transformer_lm", "multimax_transformer"), arch
    # importing the plugin again by the name fairseq gives it registers nothing twice
    import importlib
    import sys

    sys.path.insert(0, str(Path(plugin.USER_DIR).parent))
    try:
        importlib.import_module("fairseq_plugin")
    finally:
        sys.path.pop(0)


def test_architecture_hyper_parameters_match_fairseq():
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    for arch in ("transformer_iwslt_de_en", "transformer_wmt_en_de", "transformer_lm_wiki103"):
        stock, ours = Namespace(), Namespace()
        ARCH_CONFIG_REGISTRY[arch](stock)
        ARCH_CONFIG_REGISTRY["multimax_" + arch](ours)
        plugin_keys = {f for f in plugin.MultimaxOptions.__dataclass_fields__}
        assert {k: v for k, v in vars(ours).items() if k not in plugin_keys} == vars(stock)
        assert ours.attn_normalizer == "softmax" and ours.output_normalizer == "softmax"


def test_stock_transformer_lm_unchanged_after_import(tmp_path):
    from fairseq.models.transformer import TransformerDecoder
    from fairseq.modules import MultiheadAttention
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

    # fairseq's classes keep their own methods (nothing patched in memory)
    assert MultiheadAttention.forward.__module__ == "fairseq.modules.multihead_attention"
    assert TransformerDecoder.build_decoder_layer.__module__.startswith("fairseq.models")
    model, task, _ = build(lm_data_dir(tmp_path), "language_modeling", "transformer_lm", LM_SIZES)
    assert type(model.decoder) is TransformerDecoder
    for layer in model.decoder.layers:
        assert type(layer) is TransformerDecoderLayerBase
        assert type(layer.self_attn) is MultiheadAttention
    assert not any("normalizer" in k for k in model.state_dict())
    tokens = token_batch(task.dictionary, [6, 4], left_pad=False)
    model.eval()
    out = model(tokens)
    expected = torch.log_softmax(out[0].float(), dim=-1)
    torch.testing.assert_close(model.get_normalized_probs(out, log_probs=True), expected)


# --- softmax / softmax equals fairseq's stock models ---------------------------------------


def _assert_same_model(stock, ours):
    stock_sd, our_sd = stock.state_dict(), ours.state_dict()
    assert list(stock_sd) == list(our_sd)
    ours.load_state_dict(stock_sd, strict=True)


def _incremental(model, tokens, encoder_out=None, reorder_at=None, new_order=None):
    """Step-by-step decoder outputs (B, T, V), reordering the cache like beam search."""
    state: dict = {}
    steps = []
    for t in range(tokens.size(1)):
        if reorder_at is not None and t == reorder_at:
            model.decoder.reorder_incremental_state_scripting(state, new_order)
            tokens = tokens.index_select(0, new_order)
            if encoder_out is not None:
                encoder_out = model.encoder.reorder_encoder_out(encoder_out, new_order)
        out, _ = model.decoder(tokens[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
        steps.append(out[:, -1])
    return torch.stack(steps, dim=1)


def test_lm_softmax_equals_stock_transformer_lm(tmp_path):
    data = lm_data_dir(tmp_path)
    stock, task, _ = build(data, "language_modeling", "transformer_lm", LM_SIZES + NO_DROPOUT)
    ours, _, _ = build(data, "language_modeling", "multimax_transformer_lm", LM_SIZES + NO_DROPOUT)
    # same seed -> same initial weights; the stock state dict loads strictly
    for key, value in stock.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    _assert_same_model(stock, ours)
    tokens = token_batch(task.dictionary, [9, 7, 5], left_pad=False)

    stock.train(), ours.train()
    torch.testing.assert_close(ours(tokens)[0], stock(tokens)[0], atol=1e-5, rtol=1e-5)
    stock.eval(), ours.eval()
    full = stock(tokens)[0]
    torch.testing.assert_close(ours(tokens)[0], full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ours_steps, stock_steps = _incremental(ours, tokens), _incremental(stock, tokens)
        torch.testing.assert_close(ours_steps, stock_steps, atol=1e-5, rtol=1e-5)
        real = tokens.ne(task.dictionary.pad())  # padded positions differ (positions restart)
        torch.testing.assert_close(ours_steps[real], full[real], atol=1e-5, rtol=1e-5)
        order = torch.tensor([2, 0, 0])
        torch.testing.assert_close(
            _incremental(ours, tokens, reorder_at=3, new_order=order),
            _incremental(stock, tokens, reorder_at=3, new_order=order),
            atol=1e-5,
            rtol=1e-5,
        )


def test_translation_softmax_equals_stock_transformer_iwslt_de_en(tmp_path):
    data = mt_data_dir(tmp_path)
    stock, task, _ = build(data, "translation", "transformer_iwslt_de_en", MT_SIZES + NO_DROPOUT)
    ours, _, _ = build(
        data, "translation", "multimax_transformer_iwslt_de_en", MT_SIZES + NO_DROPOUT
    )
    for key, value in stock.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    _assert_same_model(stock, ours)
    src = token_batch(task.source_dictionary, [8, 5, 3], left_pad=True, seed=1)
    src_lengths = src.ne(task.source_dictionary.pad()).sum(1)
    tgt = shifted(
        token_batch(task.target_dictionary, [6, 7, 4], left_pad=False, seed=2),
        task.target_dictionary,
    )

    stock.train(), ours.train()
    torch.testing.assert_close(
        ours(src, src_lengths, tgt)[0], stock(src, src_lengths, tgt)[0], atol=1e-5, rtol=1e-5
    )
    stock.eval(), ours.eval()
    with torch.no_grad():
        (full, extra), (stock_full, stock_extra) = (
            ours(src, src_lengths, tgt),
            stock(src, src_lengths, tgt),
        )
        torch.testing.assert_close(full, stock_full, atol=1e-5, rtol=1e-5)
        # need_weights path: head-averaged encoder-decoder attention (alignment layer)
        torch.testing.assert_close(extra["attn"][0], stock_extra["attn"][0], atol=1e-5, rtol=1e-5)
        enc, stock_enc = ours.encoder(src, src_lengths), stock.encoder(src, src_lengths)
        steps = _incremental(ours, tgt, enc)
        torch.testing.assert_close(steps, _incremental(stock, tgt, stock_enc), atol=1e-5, rtol=1e-5)
        real = tgt.ne(task.target_dictionary.pad())
        torch.testing.assert_close(steps[real], full[real], atol=1e-5, rtol=1e-5)
        order = torch.tensor([1, 1, 0])
        torch.testing.assert_close(
            _incremental(ours, tgt, enc, reorder_at=2, new_order=order),
            _incremental(stock, tgt, stock_enc, reorder_at=2, new_order=order),
            atol=1e-5,
            rtol=1e-5,
        )


# --- every normaliser -----------------------------------------------------------------------

ALL_NORMALIZERS = ["softmax", "sparsemax", "entmax15", "evsoftmax", "multimax"]


@pytest.mark.parametrize("name", ALL_NORMALIZERS)
def test_beam_search_every_normalizer_with_padding(tmp_path, name):
    data = mt_data_dir(tmp_path)
    extra = MT_SIZES + ["--attn-normalizer", name, "--output-normalizer", name]
    model, task, cfg = build(data, "translation", "multimax_transformer_iwslt_de_en", extra)
    attn = model.decoder.layers[0].encoder_attn
    assert type(attn.normalizer).__name__.lower() == name.replace("entmax15", "entmax15")
    model.eval()
    src = token_batch(task.source_dictionary, [9, 4, 2, 6], left_pad=True, seed=3)
    sample = {
        "id": torch.arange(src.size(0)),
        "net_input": {
            "src_tokens": src,
            "src_lengths": src.ne(task.source_dictionary.pad()).sum(1),
        },
    }
    cfg.generation.beam = 3
    cfg.generation.max_len_b = 8
    cfg.generation.print_alignment = "hard"  # exercises the need_weights path in search
    generator = task.build_generator([model], cfg.generation)
    with torch.no_grad():
        hypos = task.inference_step(generator, [model], sample)
    assert len(hypos) == src.size(0)
    for sentence in hypos:
        assert len(sentence) == 3
        for hypo in sentence:
            assert hypo["tokens"].numel() > 0
            assert torch.isfinite(hypo["score"]), (name, hypo["score"])
            assert torch.isfinite(hypo["positional_scores"]).all()
            assert not torch.isnan(hypo["attention"]).any()


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "evsoftmax", "multimax"])
def test_output_distribution(tmp_path, name):
    from multimax.integrations.fairseq_plugin.layers import SEARCH_LOG_PROB_FLOOR

    data = lm_data_dir(tmp_path)
    extra = LM_SIZES + ["--output-normalizer", name]
    model, task, _ = build(data, "language_modeling", "multimax_transformer_lm", extra)
    model.eval()
    tokens = token_batch(task.dictionary, [6, 6], left_pad=False)
    out = model(tokens)
    out = (out[0] * 20, out[1])  # sharpen so sparse normalisers give exact zeros
    probs = model.get_normalized_probs(out, log_probs=False)
    expected = model.decoder.output_normalizer(out[0].float())
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    scoring = model.get_normalized_probs(out, log_probs=True, sample={"target": tokens})
    search = model.get_normalized_probs(out, log_probs=True)
    assert not torch.isnan(scoring).any() and not torch.isnan(search).any()
    assert torch.isfinite(search).all() and search.min() >= SEARCH_LOG_PROB_FLOOR
    if name != "multimax":
        assert (probs == 0).any(), "sparse normaliser expected to give exact zeros here"
        assert torch.isneginf(scoring[probs == 0]).all()
    torch.testing.assert_close(scoring.exp(), probs, atol=1e-6, rtol=1e-5)


def test_adaptive_softmax_needs_softmax_output(tmp_path):
    data = lm_data_dir(tmp_path)
    small = LM_SIZES[:-2] + [
        "--adaptive-input-cutoff", "10,20", "--adaptive-softmax-cutoff", "10,20",
        "--tokens-per-sample", "32", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
    ]  # fmt: skip
    stock, _, _ = build(data, "language_modeling", "transformer_lm_wiki103", small)
    ours, _, _ = build(data, "language_modeling", "multimax_transformer_lm_wiki103", small)
    assert ours.decoder.adaptive_softmax is not None
    _assert_same_model(stock, ours)
    with pytest.raises(ValueError, match="adaptive softmax"):
        build(
            data,
            "language_modeling",
            "multimax_transformer_lm_wiki103",
            [*small, "--output-normalizer", "multimax"],
        )


# --- criterion ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "multimax"])
def test_criterion_uses_library_loss_and_trains_normalizers(tmp_path, name):
    from multimax import build_loss

    data = mt_data_dir(tmp_path)
    extra = MT_SIZES + [
        "--attn-normalizer", name, "--output-normalizer", name,
        "--criterion", "multimax_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    ]  # fmt: skip
    model, task, cfg = build(data, "translation", "multimax_transformer_iwslt_de_en", extra)
    criterion = task.build_criterion(cfg.criterion)
    assert type(criterion).__name__ == "MultimaxLabelSmoothedCrossEntropyCriterion"
    src = token_batch(task.source_dictionary, [8, 5], left_pad=True, seed=4)
    target = token_batch(task.target_dictionary, [6, 3], left_pad=False, seed=5)
    sample = {
        "net_input": {
            "src_tokens": src,
            "src_lengths": src.ne(task.source_dictionary.pad()).sum(1),
            "prev_output_tokens": shifted(target, task.target_dictionary),
        },
        "target": target,
        "ntokens": int(target.ne(task.target_dictionary.pad()).sum()),
    }
    model.train()
    torch.manual_seed(0)
    loss, sample_size, log = criterion(model, sample)
    torch.manual_seed(0)
    logits = model(**sample["net_input"])[0]
    pad = task.target_dictionary.pad()
    expected = build_loss(model.decoder.output_normalizer, 0.1, ignore_index=pad, reduction="sum")(
        logits, target
    )
    torch.testing.assert_close(loss, expected)
    assert sample_size == sample["ntokens"] and {"loss", "nll_loss", "ntokens"} <= set(log)
    assert torch.isfinite(log["nll_loss"]) or name == "sparsemax"
    loss.backward()
    if name == "multimax":
        normalizers = [m for n, m in model.named_modules() if n.endswith("normalizer")]
        assert len(normalizers) == 2 * 1 + 2 * 2 + 1  # enc self, dec self + cross, output
        for module in normalizers:
            for p in module.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0


def _criterion_run(criterion, model, sample, fused: bool, monkeypatch):
    """(loss, nll, logging output, gradients) of one criterion call, through the fused output
    layer or (the decoder told it cannot fuse) through the logits."""
    with monkeypatch.context() as patch:
        if not fused:
            patch.setattr(model.decoder, "fuses_output_loss", lambda: False)
        assert criterion.fuses_output_layer(model) == fused
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks on both paths
        loss, _, log = criterion(model, sample)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), log, grads


@pytest.mark.parametrize("task_name", ["language_modeling", "translation"])
def test_fused_output_layer_in_the_criterion_equals_the_logits_path(
    tmp_path, task_name, monkeypatch
):
    """Issue 14: with a MultiMax output the criterion asks the model for its features and
    the decoder's ``output_loss`` never forms the logits (``output_layer`` is not called);
    loss, nll, the validation statistics and every parameter's gradient (the output σ and
    the shared embedding included) equal fairseq's logits path, for the LM (no smoothing)
    and for MT (label smoothing 0.1, padded targets); a softmax output is never fused."""
    from fairseq.models.transformer import TransformerDecoder

    lm = task_name == "language_modeling"
    data = lm_data_dir(tmp_path) if lm else mt_data_dir(tmp_path)
    arch = "multimax_transformer_lm" if lm else "multimax_transformer_iwslt_de_en"

    def flags(name: str) -> list[str]:
        return [*(LM_SIZES if lm else MT_SIZES), "--attn-normalizer", name,
                "--output-normalizer", name, "--share-decoder-input-output-embed",
                "--criterion", "multimax_label_smoothed_cross_entropy",
                "--label-smoothing", "0.0" if lm else "0.1"]  # fmt: skip

    model, task, cfg = build(data, task_name, arch, flags("multimax"))
    criterion = task.build_criterion(cfg.criterion)
    dictionary = task.target_dictionary
    target = token_batch(dictionary, [7, 4, 6], left_pad=False, seed=5)
    net_input = {"prev_output_tokens": shifted(target, dictionary)}
    if lm:
        net_input = {"src_tokens": net_input["prev_output_tokens"]}
    else:
        src = token_batch(task.source_dictionary, [8, 5, 6], left_pad=True, seed=4)
        net_input.update(src_tokens=src, src_lengths=src.ne(task.source_dictionary.pad()).sum(1))
    ntokens = int(target.ne(dictionary.pad()).sum())
    sample = {"net_input": net_input, "target": target, "ntokens": ntokens, "nsentences": 3}
    calls = []
    real = TransformerDecoder.output_layer

    def counting(self, features):
        calls.append(features.shape)
        return real(self, features)

    monkeypatch.setattr(TransformerDecoder, "output_layer", counting)
    for mode in ("train", "eval"):
        getattr(model, mode)()
        calls.clear()
        fused = _criterion_run(criterion, model, sample, True, monkeypatch)
        assert calls == []  # no logits were formed
        logits = _criterion_run(criterion, model, sample, False, monkeypatch)
        assert calls  # the logits path does form them
        torch.testing.assert_close(fused[0], logits[0], atol=1e-4, rtol=1e-5)
        assert fused[1].keys() == logits[1].keys()
        assert ("eps_nll_loss" in fused[1]) == (mode == "eval")
        for key in ("nll_loss", "ntokens", "sample_size", "eps_nll_loss", "zero_prob_tokens"):
            if key in fused[1]:
                got, want = (torch.as_tensor(log[key]).double() for log in (fused[1], logits[1]))
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5, msg=key)
        assert fused[2].keys() == logits[2].keys()
        assert any("output_normalizer" in name for name in fused[2])
        for name, grad in fused[2].items():
            torch.testing.assert_close(grad, logits[2][name], atol=1e-5, rtol=1e-4, msg=name)
    softmax, task, cfg = build(data, task_name, arch, flags("softmax"))
    assert not task.build_criterion(cfg.criterion).fuses_output_layer(softmax)


# --- options and checkpoints -----------------------------------------------------------------


def test_options_errors_name_the_fix(tmp_path):
    data = mt_data_dir(tmp_path)
    with pytest.raises(ValueError, match="valid: softmax"):
        build(
            data,
            "translation",
            "multimax_transformer_iwslt_de_en",
            [*MT_SIZES, "--attn-normalizer", "nope"],
        )
    with pytest.raises(ValueError, match="--attention-impl"):
        build(
            data,
            "translation",
            "multimax_transformer_iwslt_de_en",
            [*MT_SIZES, "--attention-impl", "nope"],
        )


def test_normalizer_options_reach_every_layer(tmp_path):
    data = mt_data_dir(tmp_path)
    extra = [*MT_SIZES, "--attn-normalizer", "multimax", "--multimax-order", "1",
             "--output-normalizer", "softmax", "--softmax-temperature", "2.0", "--learn-temperature",
             "--attention-impl", "reference"]  # fmt: skip
    model, _, _ = build(data, "translation", "multimax_transformer_iwslt_de_en", extra)
    attns = [m for m in model.modules() if type(m).__name__ == "MultimaxMultiheadAttention"]
    assert len(attns) == 6
    assert len({id(a.normalizer) for a in attns}) == 6  # one instance per layer
    assert all(a.normalizer.order == 1 and a.attention_impl == "reference" for a in attns)
    out = model.decoder.output_normalizer
    assert out.learn_temperature and float(out.temperature) == pytest.approx(2.0)


def test_normalizer_cli_args():
    flags = plugin.normalizer_cli_args("multimax", {"order": 1}, "softmax", {})
    assert flags[:4] == ["--attn-normalizer", "multimax", "--output-normalizer", "softmax"]
    assert flags[flags.index("--multimax-order") + 1] == "1"
    assert "--learn-temperature" in plugin.normalizer_cli_args(
        "softmax", {"learn_temperature": True}
    )
    with pytest.raises(ValueError, match="different"):
        plugin.normalizer_cli_args("multimax", {"order": 1}, "multimax", {"order": 2})


def test_checkpoint_types_allow_listed(tmp_path):
    from argparse import Namespace

    import numpy as np

    path = tmp_path / "checkpoint.pt"
    torch.save({"cfg": {"model": Namespace(arch="x")}, "best": np.float64(1.5)}, path)
    state = plugin.load_fairseq_checkpoint(str(path))
    assert state["cfg"]["model"].arch == "x" and state["best"] == 1.5


# --- the attention module itself ---------------------------------------------------------------


def _explicit_attention(attn, x, keep):
    """normalizer(q·kᵀ·scale, keep) @ v by hand, (T, B, C) in and out."""
    t, b, c = x.shape
    h, d = attn.num_heads, attn.head_dim

    def heads(y):
        return y.view(t, b, h, d).permute(1, 2, 0, 3)

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    scores = q @ k.transpose(-1, -2) * attn.scaling
    p = attn.normalizer(scores, mask=keep)
    return attn.out_proj((p @ v).permute(2, 0, 1, 3).reshape(t, b, c)), p


@pytest.mark.parametrize("name", ["multimax", "sparsemax"])
def test_attention_module_matches_explicit_formula(name):
    from multimax import build_normalizer
    from multimax.integrations.fairseq_plugin.attention import MultimaxMultiheadAttention

    torch.manual_seed(0)
    normalizer = build_normalizer(name)
    if name == "multimax":
        with torch.no_grad():  # far from identity, so σ-before-mask matters
            normalizer.low_coef.fill_(-0.5), normalizer.high_coef.fill_(-0.3)
    attn = MultimaxMultiheadAttention(16, 4, normalizer=normalizer, self_attention=True).eval()
    x = torch.randn(5, 2, 16) * 3
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    future = torch.triu(torch.full((5, 5), float("-inf")), 1)
    keep = ~pad[:, None, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    expected, weights = _explicit_attention(attn, x, keep)
    out, _ = attn(x, x, x, key_padding_mask=pad, attn_mask=future, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out, avg = attn(x, x, x, key_padding_mask=pad, attn_mask=future, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(avg, weights.mean(1), atol=1e-6, rtol=1e-5)
    assert attn._is_future_mask(future)
    future[0, 1] = 0.0  # in place: the cached answer must not be reused
    assert not attn._is_future_mask(future)


def test_record_attention_sees_every_layer(tmp_path):
    from multimax import record_attention

    data = mt_data_dir(tmp_path)
    model, task, _ = build(
        data,
        "translation",
        "multimax_transformer_iwslt_de_en",
        [*MT_SIZES, "--attn-normalizer", "multimax"],
    )
    model.eval()
    src = token_batch(task.source_dictionary, [6, 4], left_pad=True)
    tgt = shifted(
        token_batch(task.target_dictionary, [5, 5], left_pad=False), task.target_dictionary
    )
    with torch.no_grad(), record_attention() as weights:
        model(src, src.ne(task.source_dictionary.pad()).sum(1), tgt)
    assert len(weights) == 2 + 2 * 2  # encoder self; decoder self + encoder-decoder
    torch.testing.assert_close(weights[0].sum(-1)[0], torch.ones(4, 6))


def test_multimax_adam_exempts_normalizers_from_weight_decay(tmp_path):
    from fairseq import optim

    data = mt_data_dir(tmp_path)
    extra = [*MT_SIZES, "--attn-normalizer", "multimax", "--output-normalizer", "multimax",
             "--optimizer", "multimax_adam", "--weight-decay", "0.5", "--lr", "0.1"]  # fmt: skip
    model, _, cfg = build(data, "translation", "multimax_transformer_iwslt_de_en", extra)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optim.build_optimizer(cfg.optimizer, params)
    sigma = {id(p) for n, p in model.named_parameters() if "normalizer" in n}
    assert len(sigma) == 7 * 4
    decayed, exempt = optimizer.param_groups
    assert {id(p) for p in exempt["params"]} == sigma and exempt["weight_decay"] == 0.0
    assert decayed["weight_decay"] == 0.5 and not sigma & {id(p) for p in decayed["params"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only (decoupled) weight decay moves anything
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == ("normalizer" not in name and bool(before[name].abs().sum() > 0)), name


def test_beamable_encoder_attention_matches_per_beam_copies():
    from multimax import build_normalizer
    from multimax.integrations.fairseq_plugin.attention import MultimaxMultiheadAttention

    torch.manual_seed(0)
    attn = MultimaxMultiheadAttention(
        16, 4, normalizer=build_normalizer("entmax15"), encoder_decoder_attention=True
    ).eval()
    beam, sentences = 2, 2
    source = torch.randn(6, sentences, 16).repeat_interleave(beam, dim=1)  # (S, B·beam, C)
    pad = torch.zeros(sentences, 6, dtype=torch.bool)
    pad[1, :2] = True  # left padding in the second sentence
    pad = pad.repeat_interleave(beam, dim=0)
    query = torch.randn(3, sentences * beam, 16)
    expected, expected_w = attn(query, source, source, key_padding_mask=pad, static_kv=True)
    attn.set_beam_size(beam)
    state: dict = {}
    out, weights = attn(
        query, source, source, key_padding_mask=pad, static_kv=True, incremental_state=state
    )
    assert attn._get_input_buffer(state)["prev_key"].size(0) == sentences  # one copy per sentence
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_w, atol=1e-6, rtol=1e-5)
    assert torch.all(weights[2:, :, :2] == 0)  # padded keys get exactly zero weight
    # the next step reads the cache
    out2, _ = attn(query, None, None, key_padding_mask=pad, static_kv=True, incremental_state=state)
    torch.testing.assert_close(out2, expected, atol=1e-5, rtol=1e-5)


def test_every_layer_gets_the_same_keep_mask_for_one_padding_mask():
    """Masks derived downstream (flex's block mask) are cached on the mask tensor: every
    attention layer must see the same keep mask for fairseq's one key_padding_mask."""
    from multimax import build_normalizer
    from multimax.integrations.fairseq_plugin.attention import MultimaxMultiheadAttention

    layers = [
        MultimaxMultiheadAttention(
            8, 2, normalizer=build_normalizer("multimax"), self_attention=True
        )
        for _ in range(2)
    ]
    pad = torch.tensor([[False, False, True], [False, False, False]])
    first, _ = layers[0]._attention_mask(pad, None, torch.float32)
    second, _ = layers[1]._attention_mask(pad, None, torch.float32)
    assert first is second
    torch.testing.assert_close(first, ~pad[:, None, None, :])
    pad[0, 1] = True  # changed in place: a new mask
    third, _ = layers[0]._attention_mask(pad, None, torch.float32)
    assert third is not first and not bool(third[0, 0, 0, 1])

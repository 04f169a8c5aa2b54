"""Composed configs → fairseq command lines: every experiment and normaliser, the paper
recipes' flags, the output-normaliser override, distributed flags, the headline metric."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.pipelines.fairseq import commands, evaluate, stages
from tests.composition import compose

EXPERIMENTS = {
    "language_model": ["lm_wikitext103"],
    "translation": ["mt_iwslt14_deen", "mt_wmt14_ende"],
}
NORMALIZERS = [
    "softmax",
    "softmax_learned_temp",
    "sparsemax",
    "entmax15",
    "evsoftmax",
    "multimax",
    "multimax_v2",
]


@pytest.mark.parametrize(
    ("attn", "attn_opts", "out", "out_opts", "impl"),
    [
        ("multimax", {"order": 1}, "softmax", {}, "auto"),
        ("softmax", {"temperature": 2.0, "learn_temperature": True}, "softmax", {}, "auto"),
        ("sparsemax", {}, "entmax15", {}, "auto"),
        ("multimax", {"order": 2}, "multimax", {"order": 2}, "auto"),
    ],
)
def test_flags_match_the_plugins_own(attn, attn_opts, out, out_opts, impl):
    from multimax.integrations.fairseq_plugin import normalizer_cli_args

    ours = commands.plugin_flags(attn, attn_opts, out, out_opts, impl)
    assert ours == normalizer_cli_args(attn, attn_opts, out, out_opts, attention_impl=impl)


# --- composition ------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["paper", "smoke"])
@pytest.mark.parametrize(
    ("app", "experiment"), [(a, e) for a, exps in EXPERIMENTS.items() for e in exps]
)
def test_every_experiment_and_normalizer_composes(app, experiment, profile):
    for norm in NORMALIZERS:
        cfg = compose(app, [f"experiment={experiment}", f"profile={profile}", f"normalizer={norm}"])
        OmegaConf.resolve(cfg)
        args = commands.train_args(cfg, Path("/tmp/save"), cuda=False)
        name = cfg.normalizer.name
        assert args[args.index("--attn-normalizer") + 1] == name
        assert args[args.index("--output-normalizer") + 1] == name
        assert args[args.index("--arch") + 1].startswith("multimax_transformer")
        assert "--cpu" in args and "--fp16" not in args
        assert cfg.model.output_normalizer == name
        if norm == "softmax_learned_temp":
            assert "--learn-temperature" in args
        if profile == "smoke":
            assert cfg.data.name.endswith("_smoke")
            assert cfg.train.max_update <= 500
        else:
            assert not cfg.data.name.endswith("_smoke")


def test_paper_recipes_are_fairseqs():
    lm = compose("language_model", ["experiment=lm_wikitext103"])
    args = commands.train_args(lm, Path("/s"), cuda=True)
    joined = " ".join(args)
    for piece in [
        "--arch multimax_transformer_lm",
        "--share-decoder-input-output-embed",
        "--optimizer multimax_adam --adam-betas (0.9, 0.98) --weight-decay 0.01",
        "--lr 0.0005 --lr-scheduler inverse_sqrt --warmup-updates 4000",
        "--tokens-per-sample 512 --sample-break-mode none",
        "--max-tokens 2048 --update-freq 16 --max-update 50000",
    ]:
        assert piece in joined, piece
    assert "--fp16" in args and "--fp16-no-flatten-grads" in args and "--cpu" not in args
    assert "--task multimax_language_modeling" in joined
    ev = commands.eval_lm_args(lm, Path("/s/c.pt"), cuda=True)
    assert " ".join(ev).endswith(
        "--gen-subset test --batch-size 2 --tokens-per-sample 512 --context-window 400"
    )

    mt = compose("translation", ["experiment=mt_iwslt14_deen"])
    joined = " ".join(commands.train_args(mt, Path("/s"), cuda=True))
    for piece in [
        "--arch multimax_transformer_iwslt_de_en --user-dir",
        "--task multimax_translation",
        "--criterion multimax_label_smoothed_cross_entropy --eps-perplexity-epsilon 1e-06 "
        "--label-smoothing 0.1",
        "--max-tokens 4096",
        '--eval-bleu-args {"beam": 5, "max_len_a": 1.2, "max_len_b": 10}',
        "--source-lang de --target-lang en",
        "--dropout 0.3",
    ]:
        assert piece in joined, piece
    gen = commands.generate_args(mt, Path("/c.pt"), Path("/r"), cuda=True)
    assert "--beam 5" in " ".join(gen) and "--remove-bpe" in gen

    wmt = compose("translation", ["experiment=mt_wmt14_ende", "train.precision=amp"])
    args = commands.train_args(wmt, Path("/s"), cuda=True)
    assert "--share-all-embeddings" in args and "--amp" in args
    assert "--lenpen 0.6" in " ".join(commands.generate_args(wmt, Path("/c"), Path("/r")))


def test_output_normalizer_override_and_stock_arch():
    cfg = compose(
        "translation", ["normalizer=multimax", "model.output_normalizer=softmax", "profile=smoke"]
    )
    args = commands.train_args(cfg, Path("/s"), cuda=False)
    assert args[args.index("--attn-normalizer") + 1] == "multimax"
    assert args[args.index("--output-normalizer") + 1] == "softmax"
    assert args[args.index("--multimax-order") + 1] == "2"
    order1 = compose("language_model", ["normalizer=multimax", "normalizer.order=1"])
    args = commands.train_args(order1, Path("/s"), cuda=False)
    assert args[args.index("--multimax-order") + 1] == "1"
    stock = compose("language_model", ["normalizer=softmax", "model.arch=transformer_lm"])
    assert "--attn-normalizer" not in commands.train_args(stock, Path("/s"), cuda=False)
    bad = compose("language_model", ["normalizer=multimax", "model.arch=transformer_lm"])
    with pytest.raises(ValueError, match="multimax_transformer_lm"):
        commands.train_args(bad, Path("/s"), cuda=False)


def test_distributed_flags_follow_the_environment():
    cfg = compose("language_model", [])
    assert commands.distributed_flags(cfg, {}, cuda=True) == []
    torchrun = {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
                "MASTER_PORT": "1"}  # fmt: skip
    # each rank joins torchrun's group itself (fairseq's own detection divides by #GPUs)
    assert commands.distributed_flags(cfg, torchrun, cuda=True) == [
        "--distributed-world-size", "8", "--distributed-rank", "3", "--device-id", "3",
        "--distributed-init-method", "env://", "--distributed-no-spawn",
    ]  # fmt: skip
    cpu = commands.distributed_flags(cfg, torchrun, cuda=False)
    assert cpu[-4:] == ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    slurm = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "7"}
    assert commands.distributed_flags(cfg, slurm, cuda=True) == ["--distributed-port", "12355"]
    fixed = compose("language_model", ["distributed.world_size=2"])
    assert commands.distributed_flags(fixed, {}, cuda=True) == ["--distributed-world-size", "2"]
    os.environ.update({"MASTER_PORT": "1"})
    try:
        assert "MASTER_PORT" not in stages.child_env(distributed=False)
        assert "MASTER_PORT" in stages.child_env(distributed=True)
    finally:
        os.environ.pop("MASTER_PORT")


def test_headline_metric_is_eps_perplexity_for_outputs_that_give_zeros():
    for name, expected in [("softmax", "test_perplexity"), ("multimax", "test_perplexity"),
                           ("sparsemax", "test_eps_perplexity"),
                           ("entmax15", "test_eps_perplexity"),
                           ("evsoftmax", "test_eps_perplexity")]:  # fmt: skip
        cfg = compose("language_model", [f"normalizer={name}"])
        assert evaluate.headline_metric(cfg) == expected, name
    mt = compose("translation", ["normalizer=sparsemax"])
    assert evaluate.headline_metric(mt) == "sacrebleu"

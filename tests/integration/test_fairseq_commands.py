"""The LM / MT pipelines: config composition, fairseq command lines, log parsing, and real
runs (fairseq train -> eval-lm / generate -> results.json, resume, dry run) on tiny data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from apps import TINY_LM, TINY_MT, run_app
from composition import compose
from omegaconf import OmegaConf

from experiments.core.results import read_results
from experiments.pipelines.fairseq import run as fairseq_run

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

    ours = fairseq_run.plugin_flags(attn, attn_opts, out, out_opts, impl)
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
        args = fairseq_run.train_args(cfg, Path("/tmp/save"), cuda=False)
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
    args = fairseq_run.train_args(lm, Path("/s"), cuda=True)
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
    ev = fairseq_run.eval_lm_args(lm, Path("/s/c.pt"), cuda=True)
    assert " ".join(ev).endswith(
        "--gen-subset test --batch-size 2 --tokens-per-sample 512 --context-window 400"
    )

    mt = compose("translation", ["experiment=mt_iwslt14_deen"])
    joined = " ".join(fairseq_run.train_args(mt, Path("/s"), cuda=True))
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
    gen = fairseq_run.generate_args(mt, Path("/c.pt"), Path("/r"), cuda=True)
    assert "--beam 5" in " ".join(gen) and "--remove-bpe" in gen

    wmt = compose("translation", ["experiment=mt_wmt14_ende", "train.precision=amp"])
    args = fairseq_run.train_args(wmt, Path("/s"), cuda=True)
    assert "--share-all-embeddings" in args and "--amp" in args
    assert "--lenpen 0.6" in " ".join(fairseq_run.generate_args(wmt, Path("/c"), Path("/r")))


def test_output_normalizer_override_and_stock_arch():
    cfg = compose(
        "translation", ["normalizer=multimax", "model.output_normalizer=softmax", "profile=smoke"]
    )
    args = fairseq_run.train_args(cfg, Path("/s"), cuda=False)
    assert args[args.index("--attn-normalizer") + 1] == "multimax"
    assert args[args.index("--output-normalizer") + 1] == "softmax"
    assert args[args.index("--multimax-order") + 1] == "2"
    order1 = compose("language_model", ["normalizer=multimax", "normalizer.order=1"])
    args = fairseq_run.train_args(order1, Path("/s"), cuda=False)
    assert args[args.index("--multimax-order") + 1] == "1"
    stock = compose("language_model", ["normalizer=softmax", "model.arch=transformer_lm"])
    assert "--attn-normalizer" not in fairseq_run.train_args(stock, Path("/s"), cuda=False)
    bad = compose("language_model", ["normalizer=multimax", "model.arch=transformer_lm"])
    with pytest.raises(ValueError, match="multimax_transformer_lm"):
        fairseq_run.train_args(bad, Path("/s"), cuda=False)


def test_distributed_flags_follow_the_environment():
    cfg = compose("language_model", [])
    assert fairseq_run.distributed_flags(cfg, {}, cuda=True) == []
    torchrun = {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3", "MASTER_ADDR": "h",
                "MASTER_PORT": "1"}  # fmt: skip
    # each rank joins torchrun's group itself (fairseq's own detection divides by #GPUs)
    assert fairseq_run.distributed_flags(cfg, torchrun, cuda=True) == [
        "--distributed-world-size", "8", "--distributed-rank", "3", "--device-id", "3",
        "--distributed-init-method", "env://", "--distributed-no-spawn",
    ]  # fmt: skip
    cpu = fairseq_run.distributed_flags(cfg, torchrun, cuda=False)
    assert cpu[-4:] == ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    slurm = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "7"}
    assert fairseq_run.distributed_flags(cfg, slurm, cuda=True) == ["--distributed-port", "12355"]
    fixed = compose("language_model", ["distributed.world_size=2"])
    assert fairseq_run.distributed_flags(fixed, {}, cuda=True) == ["--distributed-world-size", "2"]
    os.environ.update({"MASTER_PORT": "1"})
    try:
        assert "MASTER_PORT" not in fairseq_run.child_env(distributed=False)
        assert "MASTER_PORT" in fairseq_run.child_env(distributed=True)
    finally:
        os.environ.pop("MASTER_PORT")


# --- parsing fairseq's output ---------------------------------------------------------------------


def test_parse_fairseq_log_lines():
    inner = (
        "2026-11-28 15:21:52 | INFO | train_inner | epoch 001:     15 / 36 loss=7.595, "
        "ppl=193.31, wps=26248.8, ups=25.63, wpb=1024, bsz=16, num_updates=15, lr=0.001, "
        "gnorm=0.444, train_wall=0, wall=2"
    )
    m = fairseq_run.parse_train_line(inner)
    assert m["loss"] == 7.595 and m["wps"] == 26248.8 and m["num_updates"] == 15
    assert m["lr"] == 0.001
    valid = (
        "2026-11-28 15:21:52 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 7.582 "
        "| ppl 191.58 | wps 193879 | wpb 893.2 | bsz 14 | num_updates 20 | best_loss 7.582"
    )
    v = fairseq_run.parse_train_line(valid)
    assert v["valid_loss"] == 7.582 and v["valid_ppl"] == 191.58 and v["valid_num_updates"] == 20
    assert fairseq_run.parse_train_line("| INFO | fairseq.trainer | begin training") is None
    sparse = (
        "2026-12-01 10:23:24 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 4.942 "
        "| nll_loss inf | eps_nll_loss 5.1 | zero_prob 0.0312 | ppl inf | eps_ppl 34.3 | wps 0"
    )
    v = fairseq_run.parse_train_line(sparse)
    assert v["valid_ppl"] == float("inf") and v["valid_eps_ppl"] == 34.3
    assert v["valid_zero_prob"] == 0.0312
    test = "2026-12-01 | INFO | test | valid on 'test' subset | loss 4.9 | ppl 27.58 | eps_ppl 27.6"
    assert fairseq_run.parse_validate(["x", test], "test") == {
        "test_loss": 4.9, "test_ppl": 27.58, "test_eps_ppl": 27.6
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="no summary"):
        fairseq_run.parse_validate(["nothing"], "test")


def test_lm_scores_from_the_scoring_report():
    """Every token counted: with zero-probability tokens the perplexity is null with the
    reason, the ε-perplexity and the zero share are the numbers."""
    report = {"tokens": 8, "zero_prob_tokens": 0, "loss_base2": 2.0, "eps_loss_base2": 2.001,
              "epsilon": 1e-6, "vocab": 40, "seconds": 0.5}  # fmt: skip
    scores, reasons = fairseq_run.lm_scores(report)
    assert scores["test_perplexity"] == 4.0 and scores["test_zero_prob_share"] == 0.0
    assert scores["eval_tokens_per_s"] == 16.0 and reasons == {}
    scores, reasons = fairseq_run.lm_scores({**report, "zero_prob_tokens": 2, "loss_base2": None})
    assert scores["test_perplexity"] is None and scores["test_zero_prob_share"] == 0.25
    assert scores["test_eps_perplexity"] == pytest.approx(2**2.001)
    assert "2 of 8 test tokens got probability exactly 0" in reasons["test_perplexity"]


def test_headline_metric_is_eps_perplexity_for_outputs_that_give_zeros():
    for name, expected in [("softmax", "test_perplexity"), ("multimax", "test_perplexity"),
                           ("sparsemax", "test_eps_perplexity"),
                           ("entmax15", "test_eps_perplexity"),
                           ("evsoftmax", "test_eps_perplexity")]:  # fmt: skip
        cfg = compose("language_model", [f"normalizer={name}"])
        assert fairseq_run.headline_metric(cfg) == expected, name
    mt = compose("translation", ["normalizer=sparsemax"])
    assert fairseq_run.headline_metric(mt) == "sacrebleu"


def test_bf16_is_refused_on_gpus_with_the_reason():
    from experiments.core.errors import RunStop

    with pytest.raises(RunStop, match="TPUs"):
        fairseq_run.precision_flags("bf16", cuda=True)
    assert fairseq_run.precision_flags("bf16", cuda=False) == []
    assert fairseq_run.precision_flags("amp", cuda=True) == ["--amp"]


def test_translation_scores(tmp_path):
    out = tmp_path / "generate-test.txt"
    out.write_text(
        "S-1\tein haus\nT-1\ta house .\nH-1\t-0.1\ta house .\nD-1\t-0.1\ta house .\n"
        "S-0\tder hund , ja\nT-0\tthe dog , yes\nH-0\t-0.2\tthe dog , yes\n"
        "Generate test with beam=5: BLEU4 = 41.11, 100.0/100.0/100.0/100.0 (BP=1.000)\n"
    )
    hyps, refs, bleu = fairseq_run.read_generation(out)
    assert hyps == {0: "the dog , yes", 1: "a house ."} and refs[1] == "a house ." and bleu == 41.11
    scores = fairseq_run.translation_scores(hyps, ["the dog, yes", "a house."], "en")
    assert scores["sacrebleu"] == pytest.approx(100.0)
    with pytest.raises(RuntimeError, match="references"):
        fairseq_run.translation_scores(hyps, ["only one"], "en")


# --- real runs ---------------------------------------------------------------------------------------


def test_lm_smoke_end_to_end_writes_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        "language_model",
        [
            *TINY_LM,
            "normalizer=multimax",
            "train.max_update=12",
            f"data.root={tmp_path}",
            f"hydra.run.dir={run_dir}",
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_results(run_dir / "results.json")
    assert result.task == "language_model" and result.metric_name == "test_perplexity"
    assert result.normalizer == result.output_normalizer == "multimax"
    assert result.steps == 12 and 1.0 < result.metric_value < 1e4
    assert result.metrics["train_tokens_per_s"] > 0 and result.profile == "smoke"
    assert "tokens/s" in proc.stdout and "update 10/12" in proc.stdout
    assert (run_dir / "checkpoints" / "checkpoint_last.pt").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert any("loss" in json.loads(line) for line in lines)
    from multimax.integrations.fairseq_checkpoints import load_fairseq_checkpoint

    state = load_fairseq_checkpoint(str(run_dir / "checkpoints" / "checkpoint_last.pt"))
    assert any("low_threshold" in k for k in state["model"])  # MultiMax's σ parameters


def test_mt_smoke_end_to_end_writes_bleu(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(
        "translation",
        [*TINY_MT, "normalizer=multimax", "train.max_update=8", f"data.root={tmp_path}",
         f"hydra.run.dir={run_dir}"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_results(run_dir / "results.json")
    assert result.task == "translation" and result.metric_name == "sacrebleu"
    assert result.dataset == "iwslt14_deen_smoke" and result.steps == 8
    assert 0.0 <= result.metric_value <= 100.0
    assert "tokenized_bleu" in result.metrics and "chrf" in result.metrics
    hyps = [x for x in (run_dir / "generate/generate-test.txt").read_text().splitlines()
            if x.startswith("H-")]  # fmt: skip
    assert len(hyps) == 10 and not any("nan" in h.lower().split("\t")[1] for h in hyps)


def test_mt_paper_dry_run_without_data(tmp_path):
    """dry_run=true on the paper profile: the real model and optimiser on random tokens."""
    proc = run_app(
        "translation",
        ["experiment=mt_iwslt14_deen", "dry_run=true", "logger=none", "normalizer=multimax",
         "dry_run_options.cpu_max_tokens=256", f"data.root={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[dry run]" in out and "random tokens of the real shapes" in out
    assert "parameters:" in out and "full schedule:     50,000 steps" in out
    assert "tokens per step:  4,096" in out
    params = int(out.split("parameters:")[1].split()[0].replace(",", ""))
    assert 35_000_000 < params < 45_000_000  # transformer_iwslt_de_en with 8848 / 6632 vocab
    assert not (tmp_path / "run" / "results.json").exists()


def test_lm_paper_dry_run_without_data(tmp_path):
    """The recipe's own task (multimax_language_modeling) and 267,744-word output: about 30 s,
    in the default run because the README's dry-run command depends on it."""
    proc = run_app(
        "language_model",
        ["experiment=lm_wikitext103", "dry_run=true", "logger=none", f"data.root={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "full schedule:     50,000 steps" in proc.stdout


def test_missing_real_corpus_is_a_clear_error(tmp_path):
    proc = run_app(
        "language_model",
        ["experiment=lm_wikitext103", "logger=none", f"data.root={tmp_path}",
         f"hydra.run.dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert proc.returncode != 0
    assert "python -m scripts.prepare_wikitext103" in proc.stdout + proc.stderr

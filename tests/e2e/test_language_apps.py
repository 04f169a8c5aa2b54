"""The LM / MT apps end to end on tiny data: fairseq train -> eval-lm / generate ->
results.json, the paper profiles' dry runs, and the missing-corpus error."""

from __future__ import annotations

import json

from experiments.core.results import read_results
from tests.apps import TINY_LM, TINY_MT, run_app


def test_lm_smoke_end_to_end_writes_results(tmp_path):
    """A fresh smoke corpus (Hugging Face datasets), fairseq training and scoring into
    results.json; every line printed is one of ours (no progress bars, warnings or
    third-party log records)."""
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
    printed = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert printed and all(line.startswith(("[data]", "[lm]")) for line in printed), printed
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert any("train/loss" in json.loads(line) for line in lines)
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

"""Reading fairseq's output (its ``--log-format json`` records, the scoring report, the
generation file) and the scores made from it; precision flags."""

from __future__ import annotations

import pytest

from experiments.core.errors import RunStop
from experiments.pipelines.fairseq import commands, evaluate, progress

# --- parsing fairseq's output ---------------------------------------------------------------------


def test_parse_fairseq_json_log_records():
    """fairseq's ``--log-format json`` lines (values are strings, as fairseq 0.12 writes)."""
    inner = (
        '2026-11-28 15:21:52 | INFO | train_inner | {"epoch": 1, "update": 0.417, "loss": '
        '"7.595", "ppl": "193.31", "wps": "26248.8", "ups": "25.63", "wpb": "1024", "bsz": '
        '"16", "num_updates": "15", "lr": "0.001", "gnorm": "0.444", "train_wall": "0", '
        '"wall": "2"}'
    )
    m = progress.train_metrics(inner)
    assert m["loss"] == 7.595 and m["wps"] == 26248.8 and m["num_updates"] == 15
    assert m["lr"] == 0.001
    valid = (
        '2026-11-28 15:21:52 | INFO | valid | {"epoch": 1, "valid_loss": "7.582", "valid_ppl": '
        '"191.58", "valid_wps": "193879", "valid_wpb": "893.2", "valid_bsz": "14", '
        '"valid_num_updates": "20", "valid_best_loss": "7.582"}'
    )
    v = progress.train_metrics(valid)
    assert v["valid_loss"] == 7.582 and v["valid_ppl"] == 191.58 and v["valid_num_updates"] == 20
    assert "epoch" not in v
    default_format = 'INFO:train_inner:{"epoch": 1, "loss": "7.595", "num_updates": "15"}'
    assert progress.train_metrics(default_format)["num_updates"] == 15
    assert progress.train_metrics("| INFO | fairseq.trainer | begin training") is None
    assert progress.train_metrics("2026 | INFO | fairseq_cli.train | {not json") is None
    epoch_end = '2026 | INFO | train | {"epoch": 1, "train_loss": "7.1", "train_ppl": "137"}'
    assert progress.train_metrics(epoch_end) is None  # the epoch summary is not a curve point
    sparse = (
        '2026-12-01 10:23:24 | INFO | valid | {"epoch": 2, "valid_loss": "4.942", '
        '"valid_nll_loss": "inf", "valid_eps_nll_loss": "5.1", "valid_zero_prob": "0.0312", '
        '"valid_ppl": "inf", "valid_eps_ppl": "34.3", "valid_wps": "0"}'
    )
    v = progress.train_metrics(sparse)
    assert v["valid_ppl"] == float("inf") and v["valid_eps_ppl"] == 34.3
    assert v["valid_zero_prob"] == 0.0312
    test = '2026-12-01 | INFO | test | {"test_loss": "4.9", "test_ppl": "27.58", "test_eps_ppl": "27.6"}'
    batch = '2026-12-01 | INFO | fairseq.logging.progress_bar | {"loss": "1.0"}'
    assert evaluate.parse_validate(["x", test, batch], "test") == {
        "test_loss": 4.9, "test_ppl": 27.58, "test_eps_ppl": 27.6
    }  # fmt: skip
    with pytest.raises(RuntimeError, match="no summary"):
        evaluate.parse_validate(["nothing"], "test")


def test_train_losses_read_from_a_train_log(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "$ python -m experiments.pipelines.fairseq.worker train ...\n"
        '2026 | INFO | train_inner | {"epoch": 1, "loss": "7.595", "num_updates": "5"}\n'
        "2026 | INFO | fairseq.trainer | Saved checkpoint\n"
        '2026 | INFO | train_inner | {"epoch": 1, "loss": "6.1", "num_updates": "10"}\n'
    )
    assert progress.train_losses(log) == {5: 7.595, 10: 6.1}


def test_lm_scores_from_the_scoring_report():
    """Every token counted: with zero-probability tokens the perplexity is null with the
    reason, the ε-perplexity and the zero share are the numbers."""
    report = {"tokens": 8, "zero_prob_tokens": 0, "loss_base2": 2.0, "eps_loss_base2": 2.001,
              "epsilon": 1e-6, "vocab": 40, "seconds": 0.5}  # fmt: skip
    scores, reasons = evaluate.lm_scores(report)
    assert scores["test_perplexity"] == 4.0 and scores["test_zero_prob_share"] == 0.0
    assert scores["eval_tokens_per_s"] == 16.0 and reasons == {}
    scores, reasons = evaluate.lm_scores({**report, "zero_prob_tokens": 2, "loss_base2": None})
    assert scores["test_perplexity"] is None and scores["test_zero_prob_share"] == 0.25
    assert scores["test_eps_perplexity"] == pytest.approx(2**2.001)
    assert "2 of 8 test tokens got probability exactly 0" in reasons["test_perplexity"]


def test_bf16_is_refused_on_gpus_with_the_reason():
    with pytest.raises(RunStop, match="TPUs"):
        commands.precision_flags("bf16", cuda=True)
    assert commands.precision_flags("bf16", cuda=False) == []
    assert commands.precision_flags("amp", cuda=True) == ["--amp"]


def test_translation_scores(tmp_path):
    out = tmp_path / "generate-test.txt"
    out.write_text(
        "S-1\tein haus\nT-1\ta house .\nH-1\t-0.1\ta house .\nD-1\t-0.1\ta house .\n"
        "S-0\tder hund , ja\nT-0\tthe dog , yes\nH-0\t-0.2\tthe dog , yes\n"
        "Generate test with beam=5: BLEU4 = 41.11, 100.0/100.0/100.0/100.0 (BP=1.000)\n"
    )
    hyps, refs, bleu = evaluate.read_generation(out)
    assert hyps == {0: "the dog , yes", 1: "a house ."} and refs[1] == "a house ." and bleu == 41.11
    scores = evaluate.translation_scores(hyps, ["the dog, yes", "a house."], "en")
    assert scores["sacrebleu"] == pytest.approx(100.0)
    with pytest.raises(RuntimeError, match="references"):
        evaluate.translation_scores(hyps, ["only one"], "en")

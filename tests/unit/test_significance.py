"""Per-example records, confidence intervals and paired tests: a model against itself is
not significantly different, a model against a corrupted copy of itself is; the tables show
both; sacreBLEU's own command line runs its paired bootstrap on the kept records."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.core.per_example import (
    HYPOTHESES,
    REFERENCES,
    load_per_example,
    record_dir,
    save_image_correctness,
    save_token_log_probs,
    save_translations,
)
from experiments.core.results import RunResult
from experiments.pipelines.report import significance as sig
from experiments.pipelines.report import tables as mt
from experiments.pipelines.report.significance import Records

RNG = np.random.default_rng(0)
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "house",
    "big",
    "small",
    "red",
    "blue",
    "went",
    "home",
    "fast",
    "slow",
]
REFS = [" ".join(RNG.choice(WORDS, size=9)) for _ in range(120)]
GOOD = [" ".join(r.split()[:7] + list(RNG.choice(WORDS, size=2))) for r in REFS]
# every second sentence replaced by random words: a clearly worse system
CORRUPTED = [" ".join(RNG.choice(WORDS, size=9)) if i % 2 else h for i, h in enumerate(GOOD)]
CORRECT = RNG.random(600) < 0.7
LOG_PROBS = np.log(RNG.uniform(0.05, 0.9, size=2000))


def _flip(correct: np.ndarray, share: float) -> np.ndarray:
    """The correctness with ``share`` of the right answers turned wrong."""
    out = correct.copy()
    right = np.flatnonzero(out)
    out[right[: int(share * len(right))]] = False
    return out


def _scored(record_kind: str, values, metric: str, tmp_path: Path, name: str) -> sig.Scored:
    run_dir = tmp_path / name
    if record_kind == "image":
        save_image_correctness(run_dir, values)
    elif record_kind == "lm":
        save_token_log_probs(record_dir(run_dir) / "token_log_probs.npz", values, 1e-6, 50)
    else:
        save_translations(run_dir, values, REFS, "nrefs:1|case:mixed|tok:13a|version:test")
    return sig.scored(load_per_example(run_dir), metric)


def test_records_round_trip_compressed_and_atomic(tmp_path: Path) -> None:
    save_image_correctness(tmp_path, CORRECT)
    save_image_correctness(tmp_path, CORRECT)  # a re-evaluation replaces, never appends
    record = load_per_example(tmp_path)
    assert record.kind == "image_correct" and np.array_equal(record.correct, CORRECT)
    assert sorted(p.name for p in record_dir(tmp_path).iterdir()) == ["image_correct.npz"]
    assert (record_dir(tmp_path) / "image_correct.npz").stat().st_size < CORRECT.size
    assert load_per_example(tmp_path / "elsewhere") is None
    (record_dir(tmp_path) / "image_correct.npz").write_bytes(b"cut short")
    with pytest.raises(ValueError, match="image_correct.npz: unreadable per-example record"):
        load_per_example(tmp_path)


@pytest.mark.parametrize(
    ("kind", "metric", "same", "worse"),
    [
        ("image", "top1", CORRECT, _flip(CORRECT, 0.15)),
        ("lm", "test_perplexity", LOG_PROBS, LOG_PROBS - 0.2 * (np.arange(2000) % 2)),
        ("lm", "test_eps_perplexity", LOG_PROBS, LOG_PROBS - 0.2 * (np.arange(2000) % 2)),
        ("mt", "sacrebleu", GOOD, CORRUPTED),
    ],
)
def test_itself_is_not_significant_a_corrupted_copy_is(kind, metric, same, worse, tmp_path):
    base = _scored(kind, same, metric, tmp_path, "base")
    itself = _scored(kind, same, metric, tmp_path, "itself")
    corrupted = _scored(kind, worse, metric, tmp_path, "corrupted")
    assert sig.paired_p(itself, base, metric) == 1.0
    assert sig.paired_p(corrupted, base, metric) < sig.LEVEL
    low, high = sig.confidence_interval([base])
    assert low < base.value() < high


def test_sacrebleu_paired_test_is_sacrebleus_own(tmp_path: Path) -> None:
    """The BLEU p value is the one sacreBLEU's PairedTest gives (seed 12345, 1000 resamples);
    a slightly different system is not significant."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    close = [*GOOD[:-1], CORRUPTED[1]]
    _, results = PairedTest(
        [("b", GOOD), ("s", close)], {"BLEU": BLEU()}, [REFS], test_type="bs", n_samples=1000
    )()
    base = _scored("mt", GOOD, "sacrebleu", tmp_path, "base")
    other = _scored("mt", close, "sacrebleu", tmp_path, "close")
    p = sig.paired_p(other, base, "sacrebleu")
    assert p == results["BLEU"][1].p_value and p > sig.LEVEL


def test_interval_widens_with_the_seed_spread(tmp_path: Path) -> None:
    one = _scored("image", CORRECT, "top1", tmp_path, "s0")
    far = _scored("image", _flip(CORRECT, 0.3), "top1", tmp_path, "s1")
    low1, high1 = sig.confidence_interval([one])
    low2, high2 = sig.confidence_interval([one, far])
    assert high2 - low2 > 2 * (high1 - low1)
    assert low2 < (one.value() + far.value()) / 2 < high2


def test_sacrebleu_command_line_runs_its_paired_bootstrap_on_the_records(tmp_path: Path) -> None:
    save_translations(tmp_path / "a", GOOD, REFS, "sig")
    save_translations(tmp_path / "b", CORRUPTED, REFS, "sig")
    a, b = record_dir(tmp_path / "a"), record_dir(tmp_path / "b")
    proc = subprocess.run(
        [sys.executable, "-m", "sacrebleu", str(a / REFERENCES), "-i", str(a / HYPOTHESES),
         str(b / HYPOTHESES), "--paired-bs", "-f", "text"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "(p = 0.0010)*" in proc.stdout


# --- the tables ------------------------------------------------------------------------------


def _run(root: Path, name: str, normalizer: str, seed: int, correct: np.ndarray) -> Path:
    run_dir = root / f"{name}_seed{seed}"
    run_dir.mkdir(parents=True)
    RunResult(task="image_classification", dataset="digits", model="deit_tiny_gap_patch16_224",
              normalizer=normalizer, output_normalizer=normalizer, seed=seed,
              metric_name="top1", metric_value=100 * float(correct.mean()), steps=10,
              wall_seconds=1.0, profile="smoke",
              config={"normalizer": {"name": normalizer},
                      "registry": {"table": "imagenet_top1"}}).write(run_dir)  # fmt: skip
    save_image_correctness(run_dir, correct)
    return run_dir


def test_tables_show_intervals_and_mark_only_the_real_difference(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for seed in (0, 1):
        correct = np.roll(CORRECT, seed)
        _run(runs, "softmax", "softmax", seed, correct)
        _run(runs, "itself", "multimax", seed, correct)  # the softmax runs under another name
        _run(runs, "corrupted", "sparsemax", seed, _flip(correct, 0.15))
    mt.make_tables([runs], tmp_path / "t")
    with (tmp_path / "t" / "imagenet_top1_smoke.csv").open() as f:
        rows = {r["normalizer"]: r for r in csv.DictReader(f)}
    assert rows["multimax"]["p_vs_softmax"] == "1.0" and rows["multimax"]["significant"] == "False"
    assert float(rows["sparsemax"]["p_vs_softmax"]) < 0.05
    assert rows["sparsemax"]["significant"] == "True"
    assert "max over seeds [0, 1]" in rows["sparsemax"]["significance_test"]
    for row in rows.values():
        assert float(row["ci_low"]) < float(row["mean"]) < float(row["ci_high"])
    assert rows["softmax"]["p_vs_softmax"] == ""  # the baseline row is not tested
    md = (tmp_path / "t" / "imagenet_top1_smoke.md").read_text()
    assert "| 95% CI |" in md and "| p vs softmax |" in md and "* marks p < 0.05" in md
    marked = [line for line in md.splitlines() if " *" in line and line.startswith("| deit")]
    assert len(marked) == 1 and "| sparsemax |" in marked[0]


def test_a_record_of_another_evaluation_is_named_and_not_used(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _run(runs, "softmax", "softmax", 0, CORRECT)
    stale = _run(runs, "multimax", "multimax", 0, CORRECT)
    save_image_correctness(stale, _flip(CORRECT, 0.5))  # not what results.json reports
    shutil.rmtree(record_dir(_run(runs, "old", "entmax15", 0, CORRECT)))  # no record at all
    _, notes = mt.make_tables([runs], tmp_path / "t")
    assert any("its per-example record gives top1" in n and "multimax" in n for n in notes)
    with (tmp_path / "t" / "imagenet_top1_smoke.csv").open() as f:
        rows = {r["normalizer"]: r for r in csv.DictReader(f)}
    assert rows["multimax"]["ci_low"] == rows["multimax"]["p_vs_softmax"] == ""
    assert rows["entmax15"]["ci_low"] == "" and rows["softmax"]["ci_low"] != ""
    assert Records().record(str(tmp_path / "nowhere" / "results.json")) is None


def test_records_of_different_test_sets_are_not_compared(tmp_path: Path) -> None:
    base = _scored("lm", LOG_PROBS, "test_perplexity", tmp_path, "base")
    shorter = _scored("lm", LOG_PROBS[:-1], "test_perplexity", tmp_path, "shorter")
    with pytest.raises(ValueError, match="1999 and 2000 test examples"):
        sig.paired_p(shorter, base, "test_perplexity")
    with pytest.raises(ValueError, match="not the same test set"):
        sig.confidence_interval([base, shorter])
    problems: list[str] = []
    row = sig.row_statistics({0: shorter}, {0: base}, "test_perplexity", problems, "row")
    assert row["p_value"] is None and row["ci_low"] is not None
    assert problems == ["row: no paired test against softmax, the two records hold 1999 and "
                        "2000 test examples (not the same test set)"]  # fmt: skip


def test_bleu_rows_are_tested_by_sacrebleus_paired_bootstrap(tmp_path: Path) -> None:
    from sacrebleu import corpus_bleu

    for normalizer, hyps in (("softmax", GOOD), ("multimax", CORRUPTED)):
        run_dir = tmp_path / "runs" / normalizer
        run_dir.mkdir(parents=True)
        RunResult(task="translation", dataset="iwslt14_deen_smoke", model="transformer_iwslt_de_en",
                  normalizer=normalizer, output_normalizer=normalizer, seed=0,
                  metric_name="sacrebleu", metric_value=corpus_bleu(hyps, [REFS]).score,
                  steps=10, wall_seconds=1.0, profile="smoke",
                  config={"registry": {"table": "iwslt14_bleu"}}).write(run_dir)  # fmt: skip
        save_translations(run_dir, hyps, REFS, "nrefs:1|case:mixed|tok:13a|version:test")
    mt.make_tables([tmp_path / "runs"], tmp_path / "t")
    with (tmp_path / "t" / "iwslt14_bleu_smoke.csv").open() as f:
        rows = {r["normalizer"]: r for r in csv.DictReader(f)}
    assert rows["multimax"]["significance_test"].startswith("sacreBLEU paired bootstrap")
    assert float(rows["multimax"]["p_vs_softmax"]) < 0.05

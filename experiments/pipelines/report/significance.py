"""Which differences in a results table are real: a 95 % confidence interval per row and a
paired test against the softmax row of the same model, from the runs' per-example records
(``experiments.core.per_example``). docs/significance.md says how to read them.

Confidence interval of a row (its mean over seeds): a two-stage bootstrap. Each of
:data:`SAMPLES` resamples draws the seeds with replacement and the test examples with
replacement (one draw of examples shared by every seed: they were all scored on the same
test set), recomputes each drawn seed's metric on the drawn examples and averages them; the
interval is the 2.5th to 97.5th percentile of those averages. With one seed it is the plain
bootstrap over test examples; with many seeds the seed spread dominates.

Paired test of a row against the softmax row, on every seed both rows ran (the same test
examples scored by both models): BLEU by sacreBLEU's own paired bootstrap
(``sacrebleu.significance.PairedTest``, the ``--paired-bs`` of its command line);
perplexity and top-1 by a paired bootstrap over test examples (each resample scores both
models on the same drawn examples; p is the share of resampled differences, centred on
their mean, at least as far from 0 as the observed one). A row with several shared seeds
gets the largest of their p values (significant only if it is on every seed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
from sacrebleu.metrics import BLEU
from sacrebleu.significance import PairedTest

from experiments.core.per_example import PerExample, load_per_example
from multimax.metrics import epsilon_log_likelihood

SAMPLES = 1000  # resamples: sacreBLEU's default for --paired-bs
RANDOM_SEED = 12345  # sacreBLEU's default SACREBLEU_SEED: the same tables on every call
LEVEL = 0.05
_CHUNK = 50  # resamples drawn at once (memory: _CHUNK x examples counts)

BLEU_TEST = f"sacreBLEU paired bootstrap ({SAMPLES} resamples)"
BOOTSTRAP_TEST = f"paired bootstrap over test examples ({SAMPLES} resamples)"


@dataclass(frozen=True)
class Scored:
    """One run's examples for one metric: per-example sufficient statistics (rows) and the
    metric of a weighted sum of them (``score(sums (B, d), weights (B,)) -> (B,)``)."""

    stats: np.ndarray
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]
    record: PerExample

    def value(self) -> float:
        return float(self.score(self.stats.sum(0, keepdims=True), np.array([len(self.stats)]))[0])


def _mean_score(transform: Callable[[np.ndarray], np.ndarray]):
    def score(sums: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            return transform(sums[:, 0] / weights)

    return score


@cache
def _bleu() -> BLEU:
    return BLEU()  # sacreBLEU's defaults: the BLEU the runs report (13a, exp smoothing)


def _bleu_score(sums: np.ndarray, _weights: np.ndarray) -> np.ndarray:
    bleu = _bleu()
    return np.array([bleu._compute_score_from_stats(list(row)).score for row in sums])


def scored(record: PerExample, metric: str) -> Scored | None:
    """The record's examples for ``metric`` (a results.json metric name), or None when the
    metric is not one the record can give."""
    if record.kind == "image_correct" and metric == "top1":
        stats = record.correct.astype(np.float64)[:, None]
        return Scored(stats, _mean_score(lambda m: 100.0 * m), record)
    if record.kind == "token_log_probs" and metric == "test_perplexity":
        return Scored(record.log_prob[:, None], _mean_score(lambda m: np.exp(-m)), record)
    if record.kind == "token_log_probs" and metric == "test_eps_perplexity":
        log_p = torch.from_numpy(record.log_prob)
        ll = epsilon_log_likelihood(log_p, record.epsilon, record.vocab).numpy()
        return Scored(ll[:, None], _mean_score(lambda m: np.exp(-m)), record)
    if record.kind == "translations" and metric == "sacrebleu":
        stats = _bleu()._extract_corpus_statistics(record.hypotheses, [record.references])
        return Scored(np.asarray(stats, dtype=np.float64), _bleu_score, record)
    return None


def _resample_counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) how often each example is drawn in each resample of n with replacement."""
    draws = rng.integers(0, n, size=(size, n))
    return np.stack([np.bincount(row, minlength=n) for row in draws]).astype(np.float64)


def _resampled_scores(runs: Sequence[Scored], rng: np.random.Generator) -> np.ndarray:
    """(SAMPLES, runs) each run's metric on the same resamples of the test examples."""
    n = len(runs[0].stats)
    out = np.empty((SAMPLES, len(runs)))
    for start in range(0, SAMPLES, _CHUNK):
        counts = _resample_counts(rng, n, min(_CHUNK, SAMPLES - start))
        weights = counts.sum(1)
        for j, run in enumerate(runs):
            out[start : start + len(counts), j] = run.score(counts @ run.stats, weights)
    return out


def confidence_interval(runs: Sequence[Scored]) -> tuple[float, float]:
    """95 % interval of the mean over ``runs`` (one per seed): the two-stage bootstrap of
    the module docstring."""
    if len({len(r.stats) for r in runs}) != 1:
        raise ValueError(
            "the seeds' records hold different numbers of test examples (not the same test set)"
        )
    rng = np.random.default_rng(RANDOM_SEED)
    scores = _resampled_scores(runs, rng)
    seeds = rng.integers(0, len(runs), size=(SAMPLES, len(runs)))
    means = np.take_along_axis(scores, seeds, axis=1).mean(1)
    low, high = np.percentile(means[np.isfinite(means)], [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap_p(system: Scored, baseline: Scored) -> float:
    """p of a paired bootstrap over test examples: both models scored on each resample;
    the resampled differences, centred on their mean, against the observed difference."""
    if len(system.stats) != len(baseline.stats):
        raise ValueError(
            f"the two records hold {len(system.stats)} and {len(baseline.stats)} test examples "
            "(not the same test set)"
        )
    observed = system.value() - baseline.value()
    scores = _resampled_scores([system, baseline], np.random.default_rng(RANDOM_SEED))
    diffs = scores[:, 0] - scores[:, 1]
    extreme = np.abs(diffs - diffs.mean()) >= abs(observed) - 1e-12
    return float((extreme.sum() + 1) / (SAMPLES + 1))


def sacrebleu_paired_p(system: PerExample, baseline: PerExample) -> float:
    """p of sacreBLEU's paired bootstrap (``--paired-bs``) of ``system`` against
    ``baseline``. Identical outputs are no difference: p = 1 (sacreBLEU's statistic, which
    counts strictly larger resampled differences, would give 1/(n+1) there)."""
    if system.references != baseline.references:
        raise ValueError("the two runs' references differ (not the same test set)")
    if system.signature != baseline.signature:
        raise ValueError(
            f"sacreBLEU signatures differ ({system.signature} vs {baseline.signature})"
        )
    if system.hypotheses == baseline.hypotheses:
        return 1.0
    test = PairedTest(
        [("baseline", baseline.hypotheses), ("system", system.hypotheses)],
        {"BLEU": _bleu()},
        [baseline.references],
        test_type="bs",
        n_samples=SAMPLES,
    )
    _signatures, results = test()
    return float(results["BLEU"][1].p_value)


def paired_p(system: Scored, baseline: Scored, metric: str) -> float:
    if metric == "sacrebleu":
        return sacrebleu_paired_p(system.record, baseline.record)
    return paired_bootstrap_p(system, baseline)


def describe_test(metric: str) -> str:
    return BLEU_TEST if metric == "sacrebleu" else BOOTSTRAP_TEST


class Records:
    """Per-example records read once per run directory; a row's runs as :class:`Scored`,
    checked against the values its results.json reports."""

    def __init__(self) -> None:
        self._cache: dict[Path, PerExample | None] = {}
        self.problems: list[str] = []

    def record(self, results_path: str) -> PerExample | None:
        run_dir = Path(results_path).parent
        if run_dir not in self._cache:
            try:
                self._cache[run_dir] = load_per_example(run_dir) if run_dir.is_dir() else None
            except ValueError as err:
                self.problems.append(f"{err}; no interval or test from this run")
                self._cache[run_dir] = None
        return self._cache[run_dir]

    def scored(self, results_path: str, metric: str, value: float) -> Scored | None:
        """The run's examples for ``metric``; None without a record, or (with a note) when the
        record does not give the value the run reports (a record of another evaluation)."""
        record = self.record(results_path)
        run = None if record is None else scored(record, metric)
        if run is None:
            return None
        recomputed = run.value()
        if not np.isclose(recomputed, value, rtol=1e-4, atol=1e-6):
            self.problems.append(
                f"{Path(results_path).parent}: its per-example record gives {metric} = "
                f"{recomputed:.6g}, results.json {value:.6g}; no interval or test from this run"
            )
            return None
        return run


def row_statistics(
    runs: dict[int, Scored | None],
    baseline: dict[int, Scored | None] | None,
    metric: str,
    problems: list[str],
    where: str = "",
) -> dict:
    """A row's ``ci_low``, ``ci_high`` (None without every seed's record), ``p_value`` and
    ``test`` (None for the baseline row itself, or without a seed both rows ran with
    records); why one is missing although the records exist goes to ``problems``."""
    out = {"ci_low": None, "ci_high": None, "p_value": None, "test": None}
    if runs and all(r is not None for r in runs.values()):
        try:
            out["ci_low"], out["ci_high"] = confidence_interval(list(runs.values()))
        except ValueError as err:
            problems.append(f"{where}: no confidence interval, {err}")
    if baseline is None:
        return out
    shared = sorted(s for s in runs if runs[s] is not None and baseline.get(s) is not None)
    p_values = []
    for seed in shared:
        try:
            p_values.append(paired_p(runs[seed], baseline[seed], metric))
        except ValueError as err:
            problems.append(f"{where}: no paired test against softmax, {err}")
            return out
    if p_values:
        seeds = f"seed {shared[0]}" if len(shared) == 1 else f"max over seeds {shared}"
        out["p_value"] = max(p_values)
        out["test"] = f"{describe_test(metric)}, {seeds}"
    return out

"""The test-split evaluation of a trained checkpoint and the numbers it gives: perplexity and
ε-perplexity over every token (LM, our ``score_lm`` stage), beam search with sacreBLEU / chrF
/ fairseq's tokenised BLEU and the teacher-forced likelihood (MT, ``fairseq-generate`` and
``fairseq-validate``), and the run's headline metric. Each evaluation keeps its per-example
record in ``<run dir>/per_example/`` (``experiments.core.per_example``): the LM's per-token
log-probabilities, the MT's detokenised hypotheses, references and sacreBLEU signature."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sacrebleu
from omegaconf import DictConfig

from experiments.core.per_example import TOKEN_LOG_PROBS, record_dir, save_translations
from experiments.core.setup import normalizer_options
from experiments.pipelines.fairseq.commands import (
    data_dir,
    eval_lm_args,
    generate_args,
    validate_args,
)
from experiments.pipelines.fairseq.progress import numbers, parse_log_record
from experiments.pipelines.fairseq.stages import run_stage
from experiments.pipelines.fairseq.translation_text import compound_split_bleu, detokenize
from experiments.pipelines.fairseq.worker import parse_report

# Output normalisers whose evaluation distribution can give a token probability exactly 0:
# their headline LM metric is the ε-perplexity.
ZERO_PROBABILITY_OUTPUTS = ("sparsemax", "entmax15", "evsoftmax")


def headline_metric(cfg: DictConfig) -> str:
    """The run's ``metric_name``: the experiment's, except that an LM whose output
    normaliser can give a token probability 0 is ranked by its ε-perplexity."""
    output, _ = normalizer_options(cfg, "output")
    if cfg.task == "language_model" and output in ZERO_PROBABILITY_OUTPUTS:
        return "test_eps_perplexity"
    return str(cfg.evaluate.metric)


def zero_probability_reasons(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Why an infinite perplexity / nll is infinite: targets with probability exactly 0."""
    reasons = {}
    for prefix in ("valid", "test"):
        zeros = metrics.get(f"{prefix}_zero_prob")
        for key in (f"{prefix}_ppl", f"{prefix}_nll_loss"):
            value = metrics.get(key)
            if isinstance(value, float) and math.isinf(value) and zeros:
                reasons[key] = (
                    f"infinite: {100 * zeros:.2f}% of the {prefix} targets got probability "
                    f"exactly 0 (see {prefix}_eps_ppl)"
                )
    return reasons


def evaluate_lm(cfg: DictConfig, checkpoint: Path, run_dir: Path, progress) -> tuple[dict, dict]:
    """Test perplexity and ε-perplexity over every token (``score_lm``)."""
    args = eval_lm_args(cfg, checkpoint)
    args += ["--eps-perplexity-epsilon", str(cfg.evaluate.eps_perplexity_epsilon)]
    args += ["--token-log-probs", str(record_dir(run_dir) / TOKEN_LOG_PROBS)]
    print(f"[lm] scoring the test split with {checkpoint.name} (every token counted)", flush=True)
    reports: dict[str, Any] = {}

    def on_line(line: str) -> None:
        report = parse_report(line)
        if report is not None:
            reports[report[0]] = report[1]

    run_stage("score_lm", args, run_dir / "eval_lm.log", on_line)
    if "score_lm" not in reports:
        raise RuntimeError(f"the test scoring reported nothing; see {run_dir / 'eval_lm.log'}")
    return lm_scores(reports["score_lm"])


def evaluate_translation(
    cfg: DictConfig, checkpoint: Path, run_dir: Path, progress
) -> tuple[dict, dict]:
    results_dir = run_dir / "generate"
    out_file = results_dir / f"generate-{cfg.evaluate.args.get('gen_subset', 'test')}.txt"
    out_file.unlink(missing_ok=True)
    args = generate_args(cfg, checkpoint, results_dir)
    print(f"[mt] fairseq-generate on test ({checkpoint.name})", flush=True)
    lines: list[str] = []
    run_stage("generate", args, run_dir / "generate.log", lines.append)
    hyps, refs, tok_bleu = read_generation(out_file)
    raw = (data_dir(cfg) / f"test.raw.{cfg.data.target_lang}").read_text(encoding="utf-8")
    scores = translation_scores(hyps, raw.splitlines(), str(cfg.data.target_lang), run_dir)
    if tok_bleu is not None:
        scores["tokenized_bleu"] = tok_bleu
    if cfg.data.get("compound_split_bleu"):  # fairseq's scripts/compound_split_bleu.sh
        ids = sorted(hyps)
        scores["compound_split_bleu"] = compound_split_bleu(
            [hyps[i] for i in ids], [refs[i] for i in ids]
        )
    for line in lines:
        if m := re.search(r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", line):
            scores["generate_tokens_per_s"] = float(m.group(2))
    scores.update(test_likelihood(cfg, checkpoint, run_dir))
    return scores, {}


def test_likelihood(cfg: DictConfig, checkpoint: Path, run_dir: Path) -> dict[str, float]:
    """The test split's teacher-forced loss, perplexity, ε-perplexity and zero-probability
    share under the evaluation distribution (``fairseq-validate`` with the checkpoint's own
    criterion): ``test_loss``, ``test_ppl``, ``test_eps_ppl``, ``test_zero_prob``, ..."""
    subset = str(cfg.evaluate.args.get("gen_subset", "test"))
    print(f"[mt] teacher-forced likelihood of the {subset} split ({checkpoint.name})", flush=True)
    lines: list[str] = []
    run_stage("validate", validate_args(cfg, checkpoint, subset), run_dir / "validate.log",
              lines.append)  # fmt: skip
    scores = parse_validate(lines, subset)
    scores["eps_perplexity_epsilon"] = float(cfg.evaluate.eps_perplexity_epsilon)
    return scores


def lm_scores(report: Mapping[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """(metrics, reasons for nulls) from the ``score_lm`` stage's report: test loss (base 2)
    and perplexity over every token (null when some token got probability 0), the
    ε-perplexity with its ε, the share of tokens with probability 0, evaluation speed."""
    tokens = int(report["tokens"])
    zeros = int(report["zero_prob_tokens"])
    loss = report.get("loss_base2")
    out: dict[str, float | None] = {
        "test_loss_base2": loss,
        "test_perplexity": None if loss is None else 2.0 ** float(loss),
        "test_eps_perplexity": 2.0 ** float(report["eps_loss_base2"]),
        "eps_perplexity_epsilon": float(report["epsilon"]),
        "test_zero_prob_share": zeros / tokens,
        "eval_tokens": float(tokens),
        "eval_tokens_per_s": tokens / max(float(report["seconds"]), 1e-9),
    }
    reasons = {}
    if loss is None:
        why = f"{zeros} of {tokens} test tokens got probability exactly 0 (see test_eps_perplexity)"
        reasons = {"test_loss_base2": why, "test_perplexity": why}
    return out, reasons


def parse_validate(lines: list[str], subset: str) -> dict[str, float]:
    """``fairseq-validate``'s summary record for ``subset``: ``{test_loss: ..., test_ppl: ...,
    test_eps_ppl: ..., test_zero_prob: ...}`` (its keys carry the subset's name)."""
    for line in reversed(lines):
        parsed = parse_log_record(line)
        if parsed is not None and parsed[0] == subset:
            return {k: v for k, v in numbers(parsed[1]).items() if k.startswith(f"{subset}_")}
    raise RuntimeError(f"fairseq-validate printed no summary for {subset!r}")


def read_generation(path: Path) -> tuple[dict[int, str], dict[int, str], float | None]:
    """Hypotheses and targets by sentence id (BPE removed by ``--remove-bpe``) and fairseq's
    tokenised BLEU4 from a ``fairseq-generate`` results file."""
    hyps: dict[int, str] = {}
    refs: dict[int, str] = {}
    bleu = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("H-"):
            idx, _score, text = (line[2:].split("\t") + ["", ""])[:3]
            hyps[int(idx)] = text
        elif line.startswith("T-"):
            idx, text = (line[2:].split("\t", 1) + [""])[:2]
            refs[int(idx)] = text
        elif m := re.search(r"BLEU4? = ([\d.]+)", line):
            bleu = float(m.group(1))
    return hyps, refs, bleu


def translation_scores(
    hyps: Mapping[int, str], raw_refs: list[str], target_lang: str, run_dir: Path | None = None
) -> dict[str, float]:
    """sacreBLEU (13a, the standard) and chrF of the Moses-detokenised hypotheses (sacremoses,
    as fairseq's ``--eval-bleu-detok moses``) against the untokenised references, in the
    test set's order; with ``run_dir``, the scored text and sacreBLEU's signature are kept
    there (:func:`experiments.core.per_example.save_translations`)."""
    if len(hyps) != len(raw_refs):
        raise RuntimeError(f"{len(hyps)} hypotheses for {len(raw_refs)} references")
    detok = [detokenize(hyps[i], target_lang) for i in range(len(raw_refs))]
    metric = sacrebleu.BLEU()  # corpus_bleu's defaults, with the signature at hand
    bleu = metric.corpus_score(detok, [raw_refs])
    if run_dir is not None:
        save_translations(run_dir, detok, raw_refs, str(metric.get_signature()))
    chrf = sacrebleu.corpus_chrf(detok, [raw_refs])
    return {"sacrebleu": float(bleu.score), "chrf": float(chrf.score)}

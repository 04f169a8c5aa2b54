"""Every pipeline's test evaluation keeps its per-example record, and the record gives the
number results.json reports: vision (in-process, stopped and resumed), translation scoring
(real sacremoses and sacreBLEU), and the LM and MT apps end to end (slow)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from experiments.core.per_example import load_per_example, record_dir
from experiments.pipelines.fairseq.evaluate import translation_scores
from experiments.pipelines.report.significance import scored
from experiments.pipelines.vision.data import build_datasets
from experiments.pipelines.vision.train import train
from tests.apps import SHORT_VISION, TINY_LM, TINY_MT, run_app
from tests.composition import compose


def test_a_resumed_vision_run_keeps_one_correctness_per_image(tmp_path: Path) -> None:
    overrides = ["experiment=deit_tiny_imagenet", *SHORT_VISION, "trainer.epochs=1",
                 "trainer.batch_size=256"]  # fmt: skip
    stopped = compose("vision", [*overrides, "trainer.stop_after_steps=2"])
    assert train(stopped, tmp_path) is None  # stopped before any evaluation
    assert not record_dir(tmp_path).exists()
    cfg = compose("vision", overrides)
    result = train(cfg, tmp_path)  # resumed to the end: one evaluation, one record
    record = load_per_example(tmp_path)
    assert record.kind == "image_correct"
    assert len(record) == len(build_datasets(cfg)[1])  # every validation image, once
    assert scored(record, "top1").value() == pytest.approx(result.metric_value, abs=1e-9)
    assert [p.name for p in record_dir(tmp_path).iterdir()] == ["image_correct.npz"]


def test_translation_scoring_keeps_the_scored_text_and_signature(tmp_path: Path) -> None:
    hyps = {0: "the dog , yes", 1: "a house &apos;s roof ."}
    refs = ["the dog, yes", "a house's roof."]
    scores = translation_scores(hyps, refs, "en", tmp_path)
    record = load_per_example(tmp_path)
    assert record.hypotheses == refs  # Moses-detokenised: the text sacreBLEU scored
    assert record.references == refs
    assert record.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert scored(record, "sacrebleu").value() == pytest.approx(scores["sacrebleu"])
    text = gzip.decompress((record_dir(tmp_path) / "references.txt.gz").read_bytes())
    assert text.decode() == "the dog, yes\na house's roof.\n"


@pytest.mark.slow  # two fairseq trainings: minutes on two shared cores
@pytest.mark.parametrize(
    ("app", "overrides", "metric"),
    [("language_model", TINY_LM, "test_perplexity"), ("translation", TINY_MT, "sacrebleu")],
)
def test_fairseq_apps_keep_records_that_give_their_metric(app, overrides, metric, tmp_path):
    proc = run_app(app, [*overrides, "train.max_update=8", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    record = load_per_example(tmp_path)
    assert scored(record, metric).value() == pytest.approx(results["metrics"][metric], rel=1e-4)
    if app == "language_model":
        assert len(record) == results["metrics"]["eval_tokens"]

"""``fidelity=paper|authors`` (``configs/fidelity/``) from the composed config to the model, the
fairseq command line, ``results.json``, the W&B tags and the tables: runs of the paper's text
and of the authors' code never share a row."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from experiments.core.results import RunResult
from experiments.core.setup import fidelity_label, normalizer_label
from experiments.core.tracking import run_tags
from experiments.pipelines.fairseq.commands import train_args
from experiments.pipelines.report import tables
from experiments.pipelines.vision.parts import build_model
from tests.composition import compose


@pytest.mark.parametrize("fidelity", ["paper", "authors"])
def test_vision_model_follows_the_fidelity_setting(fidelity):
    cfg = compose(
        "vision", ["experiment=deit_tiny_imagenet", "profile=smoke", f"fidelity={fidelity}"]
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    has_bias = [block.attn.qkv.bias is not None for block in model.blocks]
    assert has_bias == [fidelity == "paper"] * len(model.blocks)
    assert f"fidelity={fidelity}" in run_tags(cfg)


def test_translation_command_line_carries_the_authors_code(tmp_path):
    paper = train_args(compose("translation", ["profile=smoke"]), tmp_path, cuda=False)
    authors = train_args(
        compose("translation", ["profile=smoke", "fidelity=authors"]), tmp_path, cuda=False
    )

    def value(args, flag):
        return args[args.index(flag) + 1]

    assert value(paper, "--attn-normalizer-scope") == "encoder_self,decoder_self,cross"
    assert value(paper, "--incremental-normalizer") == "same"
    assert value(paper, "--optimizer") == "multimax_adam"  # σ scalars without weight decay
    assert value(authors, "--attn-normalizer-scope") == "encoder_self,decoder_self"
    assert value(authors, "--incremental-normalizer") == "softmax"
    assert value(authors, "--attn-sigma-init") == "trunc_normal_timm"
    assert value(authors, "--output-sigma-init") == "trunc_normal_timm"
    assert value(authors, "--optimizer") == "adam"  # fairseq's Adam decays σ too, as theirs


def test_labels_name_what_a_run_reproduces():
    paper = dict(compose("translation", ["profile=smoke"]).fidelity)
    authors = dict(compose("translation", ["profile=smoke", "fidelity=authors"]).fidelity)
    assert (
        fidelity_label(paper) == "" and normalizer_label("multimax", fidelity=paper) == "multimax"
    )
    assert normalizer_label("multimax", fidelity=authors) == "multimax [authors]"
    changed = {**paper, "incremental": "softmax"}
    assert normalizer_label("multimax", fidelity=changed) == "multimax [paper(incremental=softmax)]"
    assert normalizer_label("multimax") == "multimax"  # a run made before the setting existed
    # a table's label, given again with its output normaliser (the README's smoke table)
    assert normalizer_label("multimax [authors]", output="multimax") == "multimax [authors]"
    assert normalizer_label("softmax [authors]", output="multimax") == "softmax/multimax [authors]"


def test_paper_and_authors_runs_are_two_labelled_rows(tmp_path):
    for fidelity, bleu in (("paper", 30.0), ("authors", 29.0)):
        cfg = compose("translation", ["profile=smoke", f"fidelity={fidelity}"])
        result = RunResult(
            task="translation", dataset="iwslt14_deen_smoke", model="transformer_iwslt_de_en",
            normalizer="multimax", output_normalizer="multimax", seed=0,
            metric_name="sacrebleu", metric_value=bleu, steps=1, wall_seconds=1.0,
            profile="smoke",
        )  # fmt: skip
        (tmp_path / "runs" / fidelity).mkdir(parents=True)
        path = result.write(tmp_path / "runs" / fidelity, cfg)
        assert RunResult.read(path).fidelity == fidelity
    tables.make_tables([tmp_path / "runs"], tmp_path / "out")
    with (tmp_path / "out" / "iwslt14_bleu_smoke.csv").open() as f:
        rows = {r["normalizer"]: float(r["mean"]) for r in csv.DictReader(f)}
    assert rows == {"multimax": 30.0, "multimax [authors]": 29.0}
    assert "multimax [authors]" in (tmp_path / "out" / "iwslt14_bleu_smoke.md").read_text()


def test_a_bad_fidelity_key_is_refused_in_one_line(tmp_path):
    from tests.apps import app_env, run_app

    proc = run_app(
        "translation",
        ["profile=smoke", "logger=none", "fidelity.incremental=beam", f"hydra.run.dir={tmp_path}"],
        env=app_env(),
    )
    assert proc.returncode == 2
    assert "fidelity.incremental" in proc.stdout + proc.stderr
    assert not Path(tmp_path, "results.json").exists()

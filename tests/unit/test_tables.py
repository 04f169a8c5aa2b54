"""The results tables: results.json files in, tables out (numbers equal the files); a run's
table is the one its stored config's registry block names."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from experiments.core.io import REPO_ROOT as REPO
from experiments.core.results import RunResult
from experiments.pipelines.report import tables as mt
from experiments.pipelines.report.wandb_runs import record_from_wandb


def _run(
    root: Path,
    sub: str,
    normalizer: str,
    seed: int,
    value: float,
    table: str | None = "imagenet_top1",
    **kw,
) -> Path:
    """A run directory with a results.json written by RunResult, its config naming
    ``table`` in its registry block (no block for None)."""
    fields = dict(
        task="image_classification",
        dataset="imagenet",
        model="deit_tiny_gap_patch16_224",
        normalizer=normalizer,
        output_normalizer=normalizer,
        seed=seed,
        metric_name="top1",
        metric_value=value,
        steps=10,
        wall_seconds=1.0,
        profile="paper",
        config={"normalizer": {"name": normalizer}},
    )
    fields.update(kw)
    if table is not None:
        fields["config"] = {**fields["config"], "registry": {"table": table}}
    run_dir = root / sub
    run_dir.mkdir(parents=True)
    RunResult(**fields).write(run_dir)
    return run_dir


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    """A Hydra multirun layout: runs/<task>/multirun/<time>/<num>_<overrides>/results.json."""
    root = tmp_path / "runs" / "image_classification" / "multirun" / "2026-01-01_00-00-00"
    _run(root, "0_normalizer=softmax,seed=0", "softmax", 0, 70.0)
    _run(root, "1_normalizer=softmax,seed=1", "softmax", 1, 72.0)
    _run(root, "2_normalizer=multimax,seed=0", "multimax", 0, 71.0)
    _run(root, "3_normalizer=multimax,seed=1", "multimax", 1, 74.0)
    return tmp_path / "runs"


def _rows(csv_path: Path) -> dict[str, dict]:
    with csv_path.open() as f:
        return {r["normalizer"]: r for r in csv.DictReader(f)}


def test_seeds_aggregated_with_delta_to_softmax(multirun: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    mt.make_tables([multirun], out)
    rows = _rows(out / "imagenet_top1.csv")
    assert set(rows) == {"softmax", "multimax"}
    assert rows["softmax"]["n"] == "2" and rows["softmax"]["seeds"] == "0 1"
    assert float(rows["softmax"]["mean"]) == pytest.approx(71.0)
    assert float(rows["softmax"]["std"]) == pytest.approx(2**0.5)
    assert float(rows["multimax"]["mean"]) == pytest.approx(72.5)
    assert float(rows["multimax"]["delta_vs_softmax"]) == pytest.approx(1.5)
    md = (out / "imagenet_top1.md").read_text()
    assert "| 72.50 ± 2.12 | n/a | 2 | 0,1 | +1.50 | n/a | n/a |" in md  # no per-example records
    tex = (out / "imagenet_top1.tex").read_text()
    assert r"\begin{tabular}" in tex and "72.50 $\\pm$ 2.12" in tex


def test_editing_a_copied_results_json_changes_the_table(multirun: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(multirun, copy)
    target = next(p for p in copy.rglob("results.json") if "multimax,seed=1" in str(p))
    data = json.loads(target.read_text())
    data["metric_value"] = 80.0
    target.write_text(json.dumps(data))
    mt.make_tables([copy], tmp_path / "t")
    rows = _rows(tmp_path / "t" / "imagenet_top1.csv")
    assert float(rows["multimax"]["mean"]) == pytest.approx(75.5)
    assert "| 75.50 ± 6.36 |" in (tmp_path / "t" / "imagenet_top1.md").read_text()


def test_broken_and_partial_files_reported_by_path_and_skipped(
    multirun: Path, tmp_path: Path, capsys
) -> None:
    broken = multirun / "broken" / "results.json"
    broken.parent.mkdir()
    broken.write_text('{"task": "image_classification", "metric_va')
    partial = multirun / "partial" / "results.json"
    partial.parent.mkdir()
    partial.write_text(json.dumps({"task": "image_classification", "normalizer": "multimax"}))
    nan = _run(multirun, "nan", "multimax", 2, float("nan")) / "results.json"
    _, problems = mt.make_tables([multirun], tmp_path / "t")
    err = capsys.readouterr().err
    for path in (broken, partial, nan):
        assert str(path) in err
        assert any(str(path) in p for p in problems)
    rows = _rows(tmp_path / "t" / "imagenet_top1.csv")
    assert rows["multimax"]["n"] == "2"  # the NaN seed 2 is not averaged in
    assert str(broken) in (tmp_path / "t" / "tables.md").read_text()


def test_smoke_runs_get_separate_labelled_tables(multirun: Path, tmp_path: Path) -> None:
    _run(multirun, "smoke", "multimax", 0, 0.5, profile="smoke", dataset="digits")
    mt.make_tables([multirun], tmp_path / "t")
    smoke = (tmp_path / "t" / "imagenet_top1_smoke.md").read_text()
    assert "SMOKE RESULTS" in smoke and "NOT comparable to the paper" in smoke
    assert "| 0.500 |" in smoke and "paper" not in smoke.split("\n")[6]  # no paper column
    assert _rows(tmp_path / "t" / "imagenet_top1.csv")["multimax"]["n"] == "2"


def test_paper_values_and_variants(multirun: Path, tmp_path: Path) -> None:
    _run(multirun, "order1", "multimax", 0, 69.0,
         config={"normalizer": {"name": "multimax", "order": 1}})  # fmt: skip
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"tables": {"imagenet_top1": {"rows": [
        {"model": "deit_tiny_gap_patch16_224", "normalizer": "softmax",
         "output_normalizer": "softmax", "value": 1.0},
        {"model": "deit_tiny_gap_patch16_224", "normalizer": "multimax",
         "output_normalizer": "multimax", "value": 3.0}]}}}))  # fmt: skip
    mt.make_tables([multirun], tmp_path / "t", paper_reference=ref)
    rows = _rows(tmp_path / "t" / "imagenet_top1.csv")
    assert rows["multimax(order=1)"]["n"] == "1"
    assert rows["multimax"]["paper_value"] == "3.0"
    assert float(rows["multimax"]["paper_delta_vs_softmax"]) == 2.0
    assert rows["multimax(order=1)"]["paper_value"] == ""


def test_wmt_compound_split_bleu_rows_of_their_own(tmp_path: Path) -> None:
    """WMT runs' compound_split_bleu (results.json metrics) gets its own rows and Δ; the
    paper column stays with the headline sacrebleu."""
    root = tmp_path / "runs"
    wmt = dict(task="translation", dataset="wmt14_ende", model="transformer_wmt_en_de",
               metric_name="sacrebleu")  # fmt: skip
    for i, (norm, bleu, split_bleu) in enumerate(
        [("softmax", 26.0, 27.0), ("multimax", 26.5, 28.0)]
    ):
        _run(root, f"r{i}", norm, 0, bleu, table="wmt_bleu",
             metrics={"compound_split_bleu": split_bleu}, **wmt)  # fmt: skip
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"tables": {"wmt_bleu": {"rows": [
        {"model": "transformer_wmt_en_de", "normalizer": "softmax",
         "output_normalizer": "softmax", "value": 27.3}]}}}))  # fmt: skip
    mt.make_tables([root], tmp_path / "t", paper_reference=ref)
    with (tmp_path / "t" / "wmt_bleu.csv").open() as f:
        rows = {(r["normalizer"], r["metric_name"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(n, m) for n in ("softmax", "multimax")
                         for m in ("sacrebleu", "compound_split_bleu")}  # fmt: skip
    assert float(rows["multimax", "compound_split_bleu"]["mean"]) == 28.0
    assert float(rows["multimax", "compound_split_bleu"]["delta_vs_softmax"]) == 1.0
    assert float(rows["multimax", "sacrebleu"]["delta_vs_softmax"]) == 0.5
    assert rows["softmax", "sacrebleu"]["paper_value"] == "27.3"
    assert rows["softmax", "compound_split_bleu"]["paper_value"] == ""
    assert "compound_split_bleu" in (tmp_path / "t" / "wmt_bleu.md").read_text()


def test_shipped_paper_reference_has_only_nulls() -> None:
    ref = json.loads((REPO / "results" / "paper_reference.json").read_text())
    values = [r["value"] for t in ref["tables"].values() for r in t["rows"]]
    assert values and all(v is None for v in values)
    assert all("2406.01189" in t["source"] for t in ref["tables"].values())


def test_duplicate_seed_keeps_newest(multirun: Path, tmp_path: Path) -> None:
    _run(multirun, "rerun", "softmax", 0, 60.0, finished_at="2999-01-01T00:00:00")
    _, notes = mt.make_tables([multirun], tmp_path / "t")
    rows = _rows(tmp_path / "t" / "imagenet_top1.csv")
    assert rows["softmax"]["n"] == "2"
    assert float(rows["softmax"]["mean"]) == pytest.approx(66.0)
    assert any("superseded" in n for n in notes)


def _wandb_line(config: dict, summary: dict) -> dict:
    """The table line a W&B run's config and summary give (ValueError when none)."""
    return mt.table_lines(RunResult.from_dict(record_from_wandb(config, summary)), "w")[0]


def test_wandb_record_and_offline_error(monkeypatch) -> None:
    config = {"task": "lm", "seed": 3, "model": {"name": "transformer_lm"},
              "normalizer": {"name": "multimax", "order": 2}, "profile": {"name": "paper"},
              "data": {"name": "wikitext103"},
              "registry": {"table": "wikitext103_ppl", "metric": "test_perplexity"}}  # fmt: skip
    run = _wandb_line(config, {"metric_name": "test_ppl", "test_ppl": 30.5})
    assert (run["normalizer"], run["output_normalizer"], run["seed"]) == ("multimax", "multimax", 3)
    assert run["table"] == "wikitext103_ppl" and run["value"] == 30.5
    vision = {"task": "image_classification", "seed": 0, "model": {"name": "deit"},
              "normalizer": {"name": "softmax"},
              "registry": {"table": "imagenet_top1", "metric": "top1"}}  # fmt: skip
    assert _wandb_line(vision, {"top1": 71.5, "top5": 90.0})["value"] == 71.5
    with pytest.raises(ValueError, match="metric_value"):
        _wandb_line(vision, {"top5": 90.0})
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(SystemExit, match="WANDB_MODE=offline"):
        mt.make_tables(from_wandb="me/multimax-lm", out="unused")


def test_language_model_table_compares_eps_perplexity_where_outputs_give_zeros(tmp_path):
    """A sparse output's headline is its ε-perplexity (its perplexity is null: some tokens
    got probability 0); every LM run also gets ε-perplexity and zero-share rows, so the
    sparse row has a softmax row of the same metric (and ε) to be compared with."""
    lm = dict(task="language_model", dataset="wikitext103", model="transformer_lm",
              table="wikitext103_ppl")  # fmt: skip
    eps = {"eps_perplexity_epsilon": 1e-6}
    _run(tmp_path, "soft", "softmax", 0, 20.0, **lm, metric_name="test_perplexity",
         metrics={"test_perplexity": 20.0, "test_eps_perplexity": 20.01,
                  "test_zero_prob_share": 0.0, **eps})  # fmt: skip
    _run(tmp_path, "sparse", "sparsemax", 0, 25.0, **lm, metric_name="test_eps_perplexity",
         metrics={"test_perplexity": float("inf"), "test_eps_perplexity": 25.0,
                  "test_zero_prob_share": 0.125, **eps},
         null_reasons={"test_perplexity": "p = 0 for 1 of 8 tokens"})  # fmt: skip
    data = json.loads((tmp_path / "sparse" / "results.json").read_text())
    assert data["metrics"]["test_perplexity"] is None  # strict JSON: null, with its reason
    assert data["null_reasons"] == {"test_perplexity": "p = 0 for 1 of 8 tokens"}
    out = tmp_path / "tables"
    mt.make_tables([tmp_path], out)
    with (out / "wikitext103_ppl.csv").open() as f:
        rows = {(r["normalizer"], r["metric_name"]): r for r in csv.DictReader(f)}
    eps_name = "test_eps_perplexity (ε=1e-06)"
    assert set(rows) == {("softmax", "test_perplexity"), ("softmax", eps_name),
                         ("sparsemax", eps_name), ("softmax", "test_zero_prob_share"),
                         ("sparsemax", "test_zero_prob_share")}  # fmt: skip
    assert float(rows[("sparsemax", eps_name)]["delta_vs_softmax"]) == pytest.approx(4.99)
    assert float(rows[("sparsemax", "test_zero_prob_share")]["mean"]) == 0.125


def test_null_headline_metric_is_skipped_with_its_reason(tmp_path):
    _run(tmp_path, "dead", "softmax", 0, float("nan"), null_reasons={"metric_value": "diverged"})
    lines = mt.lines_from_paths([tmp_path])
    problems = lines.problems
    assert (
        lines.frame.empty
        and len(problems) == 1
        and "metric_value is null (diverged)" in problems[0]
    )


def test_run_without_a_registry_block_is_in_no_table(multirun: Path, tmp_path: Path) -> None:
    stray = _run(multirun, "stray", "softmax", 5, 1.0, table=None) / "results.json"
    _, problems = mt.make_tables([multirun], tmp_path / "t")
    assert any(str(stray) in p and "not in any table" in p for p in problems)
    assert _rows(tmp_path / "t" / "imagenet_top1.csv")["softmax"]["n"] == "2"


def test_table_of_an_unregistered_experiment_comes_from_the_run(tmp_path: Path) -> None:
    """A run whose experiment is not (or no longer) in configs/ still gets its table, titled
    and ordered as the run's stored registry block says."""
    run_dir = _run(tmp_path, "new", "softmax", 0, 3.0, table=None)
    data = json.loads((run_dir / "results.json").read_text())
    data["config"]["registry"] = {"table": "toy_table", "table_title": "Toy", "metric": "top1",
                                  "metric_label": "toy accuracy", "higher_is_better": False,
                                  "table_order": 7, "also": []}  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(data))
    mt.make_tables([tmp_path], tmp_path / "t")
    md = (tmp_path / "t" / "toy_table.md").read_text()
    assert md.startswith("## Toy: toy accuracy") and "lower is better" in md


def test_markdown_and_latex_layout(multirun: Path, tmp_path: Path) -> None:
    """The generated files keep their layout: an unpadded pipe table with one '---' per
    column, and a booktabs float."""
    mt.make_tables([multirun], tmp_path / "t")
    md = (tmp_path / "t" / "imagenet_top1.md").read_text().splitlines()
    assert md[6].startswith("95% CI: two-stage bootstrap")
    assert md[8] == ("| model | dataset | attention | output | metric | mean ± std | 95% CI | n | "
                     "seeds | Δ vs softmax | p vs softmax | paper | paper Δ |")  # fmt: skip
    assert md[9] == "|" + "---|" * 13
    assert md[10] == ("| deit_tiny_gap_patch16_224 | imagenet | softmax | softmax | top1 | "
                      "71.00 ± 1.41 | n/a | 2 | 0,1 | — | — | n/a | — |")  # fmt: skip
    tex = (tmp_path / "t" / "imagenet_top1.tex").read_text().splitlines()
    assert tex[3:7] == [r"\begin{table}[t]", r"\centering",
                        r"\caption{ImageNet-1K: top-1 (\%)}", r"\begin{tabular}{lllllrrrrrrrr}"]  # fmt: skip
    assert tex[-3:] == [r"\bottomrule", r"\end{tabular}", r"\end{table}"]

"""scripts/demo.py (`make demo`): runs -> results/smoke tables whose numbers are the runs'."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.core.io import REPO_ROOT as REPO
from experiments.pipelines import demo
from experiments.pipelines.report.tables import make_tables


@pytest.mark.slow  # two mechanism smoke runs + tables + figures: ~40 s alone, minutes when shared
@pytest.mark.skipif(
    not (REPO / "experiments" / "mechanism.py").exists(), reason="mechanism app not present"
)
def test_demo_tables_equal_the_runs_results(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.demo", "--pipelines", "mechanism", "--runs-dir",
         str(runs), "--out", str(out), "--figures", str(tmp_path / "figures")],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[demo 1/2" in proc.stdout and "[demo 2/2" in proc.stdout  # a line per run
    assert (tmp_path / "figures" / "simplex.png").exists()
    table = (out / "mechanism_smoke.md").read_text()
    assert "SMOKE RESULTS" in table and "NOT comparable to the paper" in table
    for name in ("softmax", "multimax"):
        value = json.loads((runs / f"mechanism_{name}" / "results.json").read_text())
        assert f" {value['metric_value']:.3f} | 1 | 0 |" in table
    readme = (out / "README.md").read_text()
    assert "SMOKE RESULTS" in readme and "| mechanism | multimax | ok |" in readme

    # edit a copied results.json: the table made from the copy changes with it
    copy = tmp_path / "copy"
    shutil.copytree(runs, copy)
    edited = copy / "mechanism_multimax" / "results.json"
    data = json.loads(edited.read_text())
    data["metric_value"] = 0.123456
    edited.write_text(json.dumps(data))
    make_tables([copy], tmp_path / "edited")
    assert " 0.123 | 1 | 0 |" in (tmp_path / "edited" / "mechanism_smoke.md").read_text()
    with (tmp_path / "edited" / "mechanism_smoke.csv").open() as f:
        rows = {r["normalizer"]: r for r in csv.DictReader(f)}
    assert float(rows["multimax"]["mean"]) == 0.123456


def test_failed_run_is_reported_with_its_log(tmp_path: Path) -> None:
    bad = demo.Pipeline("bad", "fails", "json.tool", ("--no-such-option",))  # exits with 2
    outcome = demo.run_smoke(bad, "softmax", tmp_path / "bad_softmax", ("logger=none",))
    assert outcome.status == "failed"
    assert "exit code 2" in outcome.summary and "--no-such-option" in outcome.summary
    assert (tmp_path / "bad_softmax" / "demo.log").exists()

"""scripts/sweep.sh: a real 2-normaliser x 2-seed smoke sweep through submitit's local
executor (the SLURM code path: pickled jobs, result files), then one table row per
normaliser with n = 2."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.core.io import REPO_ROOT as REPO

SWEEP = REPO / "scripts" / "sweep.sh"


def _sweep(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "WANDB_MODE": "offline", **env}
    return subprocess.run(
        ["bash", str(SWEEP), *args], cwd=REPO, env=full_env, capture_output=True, text=True
    )


@pytest.mark.skipif(
    not (REPO / "experiments" / "mechanism.py").exists(), reason="mechanism app not present"
)
def test_submitit_local_sweep_gives_one_row_per_normalizer_with_n2(tmp_path: Path) -> None:
    root = tmp_path / "sweeps"
    proc = _sweep(
        "mechanism",
        "launcher=submitit_local",
        "logger=none",
        PROFILE="smoke",
        NORMALIZERS="softmax,sparsemax",
        SEEDS="0,1",
        SWEEP_ROOT=str(root),
        TABLES_OUT=str(tmp_path / "tables"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Submitit 'local' sweep" in proc.stdout + proc.stderr
    assert len(list(root.rglob(".submitit"))) == 1  # jobs went through submitit
    assert len(list(root.rglob("results.json"))) == 4
    with (tmp_path / "tables" / "mechanism_smoke.csv").open() as f:
        rows = {r["normalizer"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"softmax", "sparsemax"}
    assert all(r["n"] == "2" and r["seeds"] == "0 1" for r in rows.values())
    assert "SMOKE RESULTS" in (tmp_path / "tables" / "mechanism_smoke.md").read_text()


def test_paper_grid_commands(tmp_path: Path) -> None:
    """DRY=1 prints the multirun of each table; an unknown table is refused."""
    for table, app, experiments in [
        # a table's experiments in file-name order (the registry reads configs/experiment/)
        ("imagenet", "experiments.vision", "deit_small_imagenet,deit_tiny_imagenet"),
        ("wikitext103", "experiments.language_model", "lm_wikitext103"),
        ("iwslt14", "experiments.translation", "mt_iwslt14_deen"),
        ("wmt14", "experiments.translation", "mt_wmt14_ende"),
        ("mechanism", "experiments.mechanism", "mechanism_retrieval"),
    ]:
        proc = _sweep(table, "launcher=slurm", DRY="1", SWEEP_DIR=str(tmp_path / table))
        if not (REPO / (app.replace(".", "/") + ".py")).exists():
            assert proc.returncode == 3 and "not in this checkout" in proc.stderr
            continue
        assert proc.returncode == 0, proc.stderr
        line = proc.stdout.splitlines()[0]
        assert f"-m {app} --multirun experiment={experiments}" in line
        assert "normalizer=softmax,sparsemax,entmax15,evsoftmax,multimax seed=0,1,2" in line
        assert line.endswith("launcher=slurm")
    bad = _sweep("cifar", DRY="1")
    assert bad.returncode == 2 and "unknown table" in bad.stderr

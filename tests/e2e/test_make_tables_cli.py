"""scripts/make_tables.py as a command: run as a file, from another directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from experiments.core.io import REPO_ROOT as REPO
from experiments.core.results import RunResult


def test_cli_as_a_file(tmp_path: Path) -> None:
    multirun = tmp_path / "runs"
    for i, (name, seed) in enumerate([("softmax", 0), ("softmax", 1), ("multimax", 0),
                                      ("multimax", 1)]):  # fmt: skip
        run_dir = multirun / f"{i}_normalizer={name},seed={seed}"
        run_dir.mkdir(parents=True)
        RunResult(task="image_classification", dataset="imagenet", model="deit", normalizer=name,
                  output_normalizer=name, seed=seed, metric_name="top1", metric_value=70.0 + i,
                  steps=10, wall_seconds=1.0,
                  config={"registry": {"table": "imagenet_top1"}}).write(run_dir)  # fmt: skip
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tables.py"), str(multirun), "--out",
         str(out)], capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 runs -> 1 tables, 2 rows" in proc.stdout
    assert (out / "imagenet_top1.md").exists() and (out / "tables.md").exists()

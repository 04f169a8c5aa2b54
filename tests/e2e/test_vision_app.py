"""The vision app as a user starts it: two torchrun processes train as one, the full smoke
profile learns the digits (slow), and unreadable images stop the app in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.core.errors import USAGE_EXIT_CODE
from experiments.core.io import REPO_ROOT as REPO
from experiments.core.results import METRICS_LOG
from tests.apps import SHORT_VISION as SHORT
from tests.apps import run_app


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / METRICS_LOG).read_text().splitlines()]
    return [x["train/loss"] for x in lines if "train/loss" in x]


def test_two_torchrun_processes_train_as_one_with_the_same_global_batch(tmp_path):
    common = [
        "experiment=deit_tiny_imagenet",
        "normalizer=multimax",
        "augment=none",  # no random augmentation, no Mixup
        *SHORT,
        "trainer.batch_size=32",
        "trainer.log_every_steps=1",
        "trainer.stop_after_steps=3",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "-m", "experiments.vision", *common, f"hydra.run.dir={tmp_path / 'one'}"]
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "experiments.vision",
        *common,
        f"hydra.run.dir={tmp_path / 'two'}",
    ]
    for cmd, processes in ((one, 1), (two, 2)):
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"{processes} process(es)" in done.stdout
    single, parallel = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == len(parallel) == 3
    torch.testing.assert_close(torch.tensor(parallel), torch.tensor(single), rtol=1e-4, atol=1e-5)
    # the parallel run really trained: its loss moved
    assert parallel[0] != parallel[2]


@pytest.mark.slow
@pytest.mark.parametrize("normalizer", ["softmax", "multimax"])
def test_full_smoke_profile_learns_the_digits_within_five_minutes(normalizer, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "experiments.vision",
        "experiment=deit_tiny_imagenet",
        "profile=smoke",
        f"normalizer={normalizer}",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["metric_value"] > 60  # chance: 10 %
    assert "train img/s" in done.stdout and "attention path:" in done.stdout


def test_the_app_stops_in_one_line_on_unreadable_images(damaged_digits, tmp_path):
    root, cut, _ = damaged_digits
    run_dir = tmp_path / "run"
    proc = run_app("vision", ["profile=smoke", "logger=none", f"data.root={root}",
                              f"hydra.run.dir={run_dir}"])  # fmt: skip
    assert proc.returncode == USAGE_EXIT_CODE
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: 2 image(s)") and str(cut) in lines[0]
    assert not run_dir.exists()  # Hydra's .hydra/ of the refused run is gone too


def test_short_smoke_run_of_the_app_writes_results_and_says_what_it_ran(tmp_path):
    """The default run's short variant of the full smoke profile: one epoch through the app."""
    proc = run_app(
        "vision",
        ["experiment=deit_tiny_imagenet", *SHORT, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["steps"] == 11 and result["metric_name"] == "top1"
    assert "train img/s" in proc.stdout and "attention path:" in proc.stdout

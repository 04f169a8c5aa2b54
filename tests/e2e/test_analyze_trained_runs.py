"""experiments/analyze.py on trained runs: the vision smoke app's checkpoints give every
figure (attention statistics, learned σ, attention maps, training curves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from experiments.core.io import REPO_ROOT
from experiments.pipelines.report import figures as analyze


@pytest.mark.slow  # trains a 1-epoch vision smoke model per normaliser: minutes on 2 cores
@pytest.mark.skipif(
    not (REPO_ROOT / "experiments" / "vision.py").exists(),
    reason="vision app not present",
)
def test_figures_of_trained_vision_runs(tmp_path: Path) -> None:
    repo = REPO_ROOT
    for name in ("softmax", "multimax"):
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.vision", "experiment=deit_tiny_imagenet",
             "profile=smoke", f"normalizer={name}", "logger=none", "trainer.epochs=1",
             f"hydra.run.dir={tmp_path / 'runs' / name}"],
            cwd=repo, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True,
            text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    figures = analyze.analyze_runs([tmp_path / "runs"], tmp_path / "figures")
    model = json.loads((tmp_path / "runs" / "softmax" / "results.json").read_text())["model"]
    names = {f.stem.name for f in figures}
    assert names == {
        "training_curves_image_classification_smoke",
        f"attention_statistics_{model}_smoke",
        f"sigma_curves_{model}_smoke",
        f"attention_maps_{model}_smoke",
    }
    for fig in figures:
        with Image.open(fig.stem.with_suffix(".png")) as image:
            image.verify()

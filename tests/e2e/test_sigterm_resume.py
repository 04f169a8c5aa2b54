"""SIGTERM anywhere (no scheduler): the app saves at the step it reached, prints one line with
the step and the exact resume command, exits with INTERRUPTED_EXIT_CODE; that command, run by
a shell as printed, ends on the uninterrupted run's number. Real apps, real signals."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import torch

from experiments.core.errors import INTERRUPTED_EXIT_CODE
from experiments.core.io import REPO_ROOT
from experiments.core.results import read_results
from experiments.pipelines.fairseq.progress import train_losses
from tests.apps import SHORT_VISION, TINY_MT, Background, app_env, run_app, wait_dead

VISION = [*SHORT_VISION, "trainer.epochs=1", "trainer.log_every_steps=4"]
MT = [*TINY_MT, "normalizer=multimax", "train.max_update=32", "train.save_interval_updates=100"]
STOPPED = re.compile(r"stopped by SIGTERM at step (\d+); (.*); to resume: (python -m .*)$", re.M)


def _stop_with_sigterm(app: str, overrides: list[str], at_line: str) -> tuple[int, re.Match]:
    bg = Background.app(app, overrides)
    bg.wait_for(at_line)
    children = bg.children()
    bg.proc.send_signal(signal.SIGTERM)  # the app process alone, as `kill PID` does
    code = bg.finish()
    assert wait_dead(children) == [], "a child outlived the stopped app"
    stopped = STOPPED.search(bg.output)
    assert stopped, bg.output[-4000:]
    assert "Traceback" not in bg.output
    return code, stopped


def _resume_as_printed(command: str) -> subprocess.CompletedProcess:
    """The printed command, run by a shell exactly as a user pastes it."""
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "against_uninterrupted", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_vision_sigterm_mid_epoch_saves_and_the_printed_command_ends_on_the_same_number(
    against_uninterrupted, tmp_path
):
    """Mid-epoch, in a run directory Hydra's grammar must quote (a quote, non-ASCII). The
    default run stops and resumes; ``-m slow`` also compares with the uninterrupted run (the
    SLURM tests compare a signalled run with it in the default run)."""
    run_dir = tmp_path / "it's ünïcode, =x"
    quoted = "hydra.run.dir='" + str(run_dir).replace("'", "\\'") + "'"
    code, stopped = _stop_with_sigterm("vision", [*VISION, quoted], "step 4/")
    assert code == INTERRUPTED_EXIT_CODE
    step = int(stopped.group(1))
    assert 4 <= step < 11  # mid-epoch
    saved = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == step and saved["sampler"] == {"epoch": 0, "batches_done": step}

    resumed = _resume_as_printed(stopped.group(3))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resuming from {run_dir} at step {step}" in resumed.stdout
    again = read_results(run_dir / "results.json")
    assert again.steps == 11
    if against_uninterrupted:
        plain = run_app("vision", [*VISION, f"hydra.run.dir={tmp_path / 'plain'}"])
        assert plain.returncode == 0, plain.stderr[-4000:]
        full = read_results(tmp_path / "plain" / "results.json")
        assert again.metric_value == pytest.approx(full.metric_value, rel=1e-6)


@pytest.mark.slow
def test_mt_sigterm_saves_at_the_update_reached_and_the_rerun_ends_on_the_same_number(tmp_path):
    data = [f"data.root={tmp_path / 'data'}"]
    plain_dir, run_dir = tmp_path / "plain", tmp_path / "run"
    plain = run_app("translation", [*MT, *data, f"hydra.run.dir={plain_dir}"])
    assert plain.returncode == 0, plain.stderr[-4000:]
    code, stopped = _stop_with_sigterm(
        "translation", [*MT, *data, f"hydra.run.dir={run_dir}"], "update 12/"
    )
    assert code == INTERRUPTED_EXIT_CODE
    step = int(stopped.group(1))
    assert 12 <= step < 32
    assert f"(update {step}), is kept" in stopped.group(2)

    resumed = _resume_as_printed(stopped.group(3))
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    full, again = (read_results(d / "results.json") for d in (plain_dir, run_dir))
    assert again.steps == full.steps == 32
    assert again.metric_value == pytest.approx(full.metric_value, rel=1e-6)
    assert train_losses(run_dir / "train.log") == train_losses(plain_dir / "train.log")

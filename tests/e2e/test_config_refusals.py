"""The apps as a user runs them: a refused config is one ``ERROR:`` line, exit code 2 and no
run directory, for single runs and for sweeps (any sweeper); a stopped run prints the command
that resumes it; ``--help`` lists what the app runs; the default output is our own lines."""

from __future__ import annotations

import shlex
import sys

import pytest

from experiments.core.errors import USAGE_EXIT_CODE
from experiments.core.io import REPO_ROOT
from tests.apps import app_env, run, run_app

REPO = REPO_ROOT

APP_CASES = [
    ("vision", ["experiment=deit_tiny_imagenet", "profile=smoke", "trainer.epochs=0"]),
    ("vision", ["+optim.lr=1e6"]),
    ("translation", ["experiment=mt_iwslt14_deen", "profile=smoke", "normalizer.order=abc"]),
    ("language_model", ["experiment=lm_wikitext103", "profile=smoke", "train.lr=-1"]),
    ("mechanism", ["experiment=mechanism_retrieval", "profile=smoke", "train.steps=0"]),
]


@pytest.mark.parametrize(("app", "overrides"), APP_CASES)
def test_the_app_stops_in_one_line_and_writes_nothing(app, overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(app, [*overrides, "logger=none", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == USAGE_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), lines
    assert not run_dir.exists()  # no .hydra/, config, log, W&B run or checkpoints/


def test_a_refused_rerun_leaves_an_existing_run_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the first start's config\n")
    (run_dir / "results.json").write_text("{}\n")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_app("mechanism", ["train.steps=0", "logger=none", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == USAGE_EXIT_CODE
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_hydra_full_error_shows_the_traceback_too(tmp_path):
    proc = run_app(
        "mechanism",
        ["train.steps=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        env=app_env(HYDRA_FULL_ERROR="1"),
    )
    assert proc.returncode == USAGE_EXIT_CODE
    assert "Traceback" in proc.stderr and "ERROR: train.steps=0" in proc.stderr


def test_a_bad_sweep_point_stops_the_sweep_before_its_first_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app(
        "mechanism",
        ["-m", "profile=smoke", "logger=none", "train.steps=5,0", f"hydra.sweep.dir={sweep}"],
    )
    assert proc.returncode == USAGE_EXIT_CODE, proc.stdout + proc.stderr
    assert "ERROR: sweep point profile=smoke logger=none train.steps=0" in proc.stderr
    assert not list(sweep.rglob("results.json"))


def test_a_typo_in_an_optuna_search_space_is_one_line(tmp_path):
    """Under Hydra's Optuna sweeper the check is not skipped: a swept key no config has is one
    ERROR line before the first trial (not a warning and an unchecked sweep)."""
    sweep = tmp_path / "sweep"
    proc = run_app(
        "mechanism",
        ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "profile=smoke",
         "logger=none", "+train.lrr=interval(0.0001,0.01)", f"hydra.sweep.dir={sweep}"],
    )  # fmt: skip
    assert proc.returncode == USAGE_EXIT_CODE, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: sweep point "), lines
    assert "train.lrr=0.0001: experiments.mechanism has no setting train.lrr" in lines[0]
    assert "did you mean train.lr?" in lines[0]
    assert not list(sweep.rglob("results.json"))


def test_help_lists_only_what_the_app_runs():
    proc = run_app("vision", ["--help"])
    assert proc.returncode == 0
    choices = proc.stdout.split("== Settings")[0]
    assert "experiment: deit_tiny_imagenet, deit_small_imagenet" in choices
    assert "data: digits, imagenet" in choices
    for other in ("lm_wikitext103", "mt_iwslt14_deen", "wikitext103", "transformer_lm"):
        assert other not in choices


def test_a_stopped_run_prints_the_command_that_resumes_it(tmp_path):
    """Without hydra.run.dir the run dir has a time stamp: "rerun the same command" would
    start a new run. The printed command names the run dir, and resumes."""
    env = app_env(PYTHONPATH=str(REPO))
    overrides = ["experiment=deit_tiny_imagenet", "profile=smoke", "logger=none",
                 "trainer.batch_size=128", "trainer.threads=1", "trainer.stop_after_steps=2"]  # fmt: skip
    first = run_app("vision", overrides, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (hint,) = [line for line in first.stdout.splitlines() if "to resume: " in line]
    command = shlex.split(hint.split("to resume: ", 1)[1])
    assert command[:3] == ["python", "-m", "experiments.vision"]
    (run_dir,) = (tmp_path / "runs" / "image_classification").iterdir()
    assert command[-1] == f"hydra.run.dir={run_dir}"
    again = run([sys.executable, *command[1:]], env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"resuming from {run_dir} at step 2" in again.stdout
    assert len(list((tmp_path / "runs" / "image_classification").iterdir())) == 1

"""The LM / MT pipelines under the faults a long run meets, with real processes: SIGKILL of
the app (its fairseq trainer must die with it, the run dir refuses a second live run), a
resume that must end on the uninterrupted run's number, a rerun of a finished run, truncated
checkpoints, a non-finite loss. Every run is the real app on the tiny smoke data."""

from __future__ import annotations

import json
import shutil

import pytest

from experiments.core.errors import STOP_EXIT_CODE
from experiments.core.results import read_results
from experiments.pipelines.fairseq.progress import train_losses
from tests.apps import TINY_LM, TINY_MT, Background, run_app, strict_json, wait_dead

# LM: 24 updates per epoch; checkpoints at 10, 20, 24 (epoch end), 30, 40.
LM = [*TINY_LM, "normalizer=multimax", "train.max_update=40", "train.save_interval_updates=10"]
# MT: checkpoints every 8 updates and at epoch ends; 32 updates in all.
MT = [*TINY_MT, "normalizer=multimax", "train.max_update=32", "train.save_interval_updates=8"]
APPS = {"lm": ("language_model", LM), "mt": ("translation", MT)}


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root):
    """The uninterrupted run of a pipeline, made when a test first asks for it:
    ``uninterrupted("lm")`` -> its run dir."""
    runs = {}

    def run_of(name: str):
        if name not in runs:
            app, overrides = APPS[name]
            run_dir = tmp_path_factory.mktemp(f"{name}_full") / "run"
            args = [*overrides, f"data.root={data_root}", f"hydra.run.dir={run_dir}"]
            _ok(run_app(app, args))
            runs[name] = run_dir
        return runs[name]

    return run_of


def _kill_app_at(app, overrides, save_line: str) -> tuple[Background, list[int]]:
    """Start the app, SIGKILL the app process alone at ``save_line``; returns it and the
    pids of its children at that moment (the fairseq trainer)."""
    bg = Background.app(app, overrides)
    bg.wait_for(save_line)
    children = bg.children()
    assert children, "the app should have a fairseq child process"
    bg.kill(group=False)
    return bg, children


@pytest.mark.parametrize("pipeline", ["lm", pytest.param("mt", marks=pytest.mark.slow)])
def test_kill_9_resume_ends_on_the_uninterrupted_number(
    pipeline, uninterrupted, data_root, tmp_path
):
    """kill -9 of the app after a mid-training checkpoint (epoch 2): its trainer dies with
    it; while it lived, a second run in the same directory was refused; the same command then
    resumes and ends on the uninterrupted run's metric, every training loss equal."""
    app, overrides = APPS[pipeline]
    run_dir = tmp_path / "run"
    args = [*overrides, f"data.root={data_root}", f"hydra.run.dir={run_dir}"]
    kill_at = "checkpoint saved @ update 30" if pipeline == "lm" else "checkpoint saved @ update 24"
    bg = Background.app(app, args)
    bg.wait_for("update ")  # training is running
    second = run_app(app, args)
    assert second.returncode == 2
    assert "in use by a live run" in second.stderr and "Traceback" not in second.stderr
    bg.wait_for(kill_at)
    trainers = bg.children()
    assert trainers
    bg.kill(group=False)  # the app only: the trainer must not outlive it
    assert wait_dead(trainers) == [], "the fairseq trainer outlived the killed app"
    assert not (run_dir / "results.json").exists()

    resumed = run_app(app, args)
    _ok(resumed)
    assert "resumed from" in resumed.stdout
    full, again = (
        read_results(uninterrupted(pipeline) / "results.json"),
        read_results(run_dir / "results.json"),
    )
    assert again.steps == full.steps
    assert f"{again.metric_value:.2f}" == f"{full.metric_value:.2f}"
    assert again.metric_value == pytest.approx(full.metric_value, rel=1e-6)
    losses = train_losses(run_dir / "train.log")
    assert losses and losses == train_losses(uninterrupted(pipeline) / "train.log")
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps)  # the lines after the checkpoint were dropped, not repeated
    assert again.wall_seconds > 0 and strict_json(run_dir / "results.json")


@pytest.mark.parametrize("pipeline", ["lm", pytest.param("mt", marks=pytest.mark.slow)])
def test_rerun_of_a_finished_run_changes_nothing(pipeline, uninterrupted, tmp_path):
    app, overrides = APPS[pipeline]
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted(pipeline), run_dir)
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    ckpts = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    proc = run_app(app, [*overrides, f"hydra.run.dir={run_dir}"])
    _ok(proc)
    assert "holds a finished run" in proc.stdout and "nothing to do" in proc.stdout
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == ckpts
    data = strict_json(run_dir / "results.json")
    assert all(v is None or isinstance(v, float) for v in data["metrics"].values())


def test_truncated_last_checkpoint_falls_back_to_the_newest_readable(
    uninterrupted, data_root, tmp_path
):
    """checkpoint_last.pt cut short: the run resumes from the newest readable checkpoint with
    one line that says so, and ends on the uninterrupted number."""
    app, overrides = APPS["lm"]
    run_dir = tmp_path / "run"
    args = [*overrides, f"data.root={data_root}", f"hydra.run.dir={run_dir}"]
    bg, trainers = _kill_app_at(app, args, "checkpoint saved @ update 30")
    wait_dead(trainers)
    last = run_dir / "checkpoints" / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    proc = run_app(app, args)
    _ok(proc)
    notes = [line for line in proc.stdout.splitlines() if "is unreadable" in line]
    assert len(notes) == 1 and "resuming from checkpoint_2_30.pt (update 30)" in notes[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    full = read_results(uninterrupted("lm") / "results.json")
    again = read_results(run_dir / "results.json")
    assert f"{again.metric_value:.2f}" == f"{full.metric_value:.2f}"


@pytest.mark.slow  # 30 s; the vision pipeline's in-process test covers the same RunDir path
def test_no_readable_checkpoint_starts_over_and_says_so(data_root, tmp_path):
    app, overrides = APPS["lm"]
    run_dir = tmp_path / "run"
    args = [*overrides, "train.max_update=12", f"data.root={data_root}", f"hydra.run.dir={run_dir}"]
    bg, trainers = _kill_app_at(app, args, "checkpoint saved @ update 10")
    wait_dead(trainers)
    for path in (run_dir / "checkpoints").glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    proc = run_app(app, args)
    _ok(proc)
    assert "no other checkpoint reads; starting over from update 0" in proc.stdout
    steps = [
        json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len([s for s in steps if s == 5]) == 1  # no duplicated training-curve steps
    assert read_results(run_dir / "results.json").steps == 12


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(data_root, tmp_path):
    app, overrides = APPS["lm"]
    run_dir = tmp_path / "run"
    proc = run_app(app, [*overrides, "+train.inject_nan_at_update=23", f"data.root={data_root}",
                         f"hydra.run.dir={run_dir}"])  # fmt: skip
    assert proc.returncode == STOP_EXIT_CODE, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR: training stopped")
    assert "at update 23" in errors[0] and "update 20" in errors[0] and "train.lr" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (run_dir / "results.json").exists()
    from multimax.integrations.fairseq_checkpoints import checkpoint_updates

    assert checkpoint_updates(run_dir / "checkpoints" / "checkpoint_last.pt") == 20

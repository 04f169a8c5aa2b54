"""The run directory and the files of a run: atomic files, checkpoint fallback,
results.json, the metrics log, and the one lifecycle (finished? → lock → resume point →
clock → trimmed metrics log → results) every pipeline opens."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from experiments.core.errors import RunStop
from experiments.core.io import atomic_write_text
from experiments.core.results import (
    METRICS_LOG,
    RESULTS_FILE,
    RunResult,
    read_results,
    write_results,
)
from experiments.core.rundir import (
    CHECKPOINT_LAST,
    CLOCK_FILE,
    LOCK_FILE,
    ResumePoint,
    RunDir,
    RunLock,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from experiments.core.tracking import log_metrics


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["a.txt"]


def test_checkpoint_falls_back_to_previous_when_last_is_corrupt(tmp_path):
    assert load_checkpoint(tmp_path) is None
    save_checkpoint({"step": 1, "w": torch.ones(2)}, tmp_path)
    save_checkpoint({"step": 2, "w": torch.zeros(2)}, tmp_path)
    assert load_checkpoint(tmp_path)["step"] == 2
    (tmp_path / CHECKPOINT_LAST).write_bytes(b"truncated garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        state = load_checkpoint(tmp_path)
    assert state["step"] == 1


def test_results_round_trip_and_broken_files(tmp_path):
    cfg = OmegaConf.create({"a": 1, "b": "${a}"})
    result = RunResult(
        task="image_classification",
        dataset="digits",
        model="m",
        normalizer="multimax",
        output_normalizer="softmax",
        seed=3,
        metric_name="top1",
        metric_value=91.5,
        steps=10,
        wall_seconds=1.5,
        profile="smoke",
    )
    path = write_results(tmp_path, result, cfg)
    data = json.loads(path.read_text())
    assert data["config"] == {"a": 1, "b": 1} and data["metric_value"] == 91.5
    assert data["git_commit"] and data["git_commit"] != ""
    assert read_results(path) == RunResult(**data)
    path.write_text('{"task": "x"')
    with pytest.raises(ValueError, match="results.json"):
        read_results(path)


def test_log_metrics_appends_jsonl(tmp_path):
    log_metrics(tmp_path, 1, {"train/loss": 2.0})
    log_metrics(tmp_path, 2, {"train/loss": 1.0, "val/top1": torch.tensor(50.0)})
    lines = [json.loads(x) for x in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert lines == [
        {"step": 1, "train/loss": 2.0},
        {"step": 2, "train/loss": 1.0, "val/top1": 50.0},
    ]


def _result(steps: int, value: float = 50.0) -> RunResult:
    return RunResult(task="unit", dataset="d", model="m", normalizer="softmax",
                     output_normalizer="softmax", seed=0, metric_name="top1",
                     metric_value=value, steps=steps, wall_seconds=1.0)  # fmt: skip


def test_a_run_with_enough_steps_is_finished_and_left_untouched(tmp_path, capsys):
    write_results(tmp_path, _result(steps=10))
    before = sorted(p.name for p in tmp_path.iterdir())
    with RunDir.open(tmp_path, total_steps=10, prefix="[x] ") as run:
        assert run.finished is not None and run.finished.steps == 10
        assert run.lock is None and run.clock is None
    out = capsys.readouterr().out
    assert out.startswith("[x] ") and "holds a finished run (top1 = 50.00" in out
    assert "nothing to do" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock, no clock
    with RunDir.open(tmp_path, total_steps=11) as run:  # a longer schedule: not finished
        assert run.finished is None


def test_open_locks_and_a_second_live_run_is_refused(tmp_path):
    with RunDir.open(tmp_path, total_steps=5) as run:
        assert run.lock is not None and run.lock_fds == (run.lock.fd,)
        with pytest.raises(RunStop, match="in use by a live run"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released on leaving
        pass
    assert (tmp_path / LOCK_FILE).exists()


def test_open_resumes_trims_the_curve_and_continues_the_clock(tmp_path):
    log_metrics(tmp_path, 5, {"train/loss": 2.0})
    log_metrics(tmp_path, 10, {"train/loss": 1.0})
    with (tmp_path / METRICS_LOG).open("a") as log:
        log.write('{"step": 11, "lo')  # a line cut short by a kill
    atomic_write_text(tmp_path / CLOCK_FILE, json.dumps({"seconds": 100.0}))
    with RunDir.open(tmp_path, total_steps=20, resume=lambda _: ResumePoint(5, "s", "note")) as run:
        assert run.resume_step == 5 and run.resume.state == "s"
        assert run.wall_seconds() >= 100.0  # the earlier invocations counted
        path = run.write_results(_result(steps=20), None)
    steps = [json.loads(x)["step"] for x in (tmp_path / METRICS_LOG).read_text().splitlines()]
    assert steps == [5]
    assert path == tmp_path / RESULTS_FILE and read_results(path).steps == 20
    assert json.loads((tmp_path / CLOCK_FILE).read_text())["seconds"] >= 100.0
    with RunDir.open(tmp_path, total_steps=20) as run:
        assert run.finished is not None


def test_a_run_at_step_0_restarts_the_clock_and_clears_the_curve(tmp_path, capsys):
    log_metrics(tmp_path, 5, {"train/loss": 2.0})
    atomic_write_text(tmp_path / CLOCK_FILE, json.dumps({"seconds": 100.0}))
    with RunDir.open(tmp_path, total_steps=20) as run:  # no resume function: step 0
        assert run.resume_step == 0 and run.wall_seconds() < 100.0
    assert (tmp_path / METRICS_LOG).read_text() == ""


def test_other_processes_neither_lock_nor_keep_the_clock(tmp_path):
    with RunDir.open(tmp_path, total_steps=5, is_main=False) as run:
        assert run.lock is None and run.clock is None and run.lock_fds == ()
        run.tick()
    assert not (tmp_path / LOCK_FILE).exists() and not (tmp_path / CLOCK_FILE).exists()


def test_latest_checkpoint_is_the_newest_readable_one_with_a_line_when_none_reads(tmp_path):
    assert latest_checkpoint(tmp_path) == ResumePoint(0)
    save_checkpoint({"step": 3}, tmp_path)
    point = latest_checkpoint(tmp_path)
    assert point.step == 3 and point.state["step"] == 3 and point.note is None
    (tmp_path / CHECKPOINT_LAST).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        point = latest_checkpoint(tmp_path)
    assert point.step == 0 and "no readable checkpoint" in point.note

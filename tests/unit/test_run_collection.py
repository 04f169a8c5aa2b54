"""The runs a table is made from: nothing dropped or mixed without a line. An unfinished
run is listed with its last step, a results.json of another task is refused, and of two
runs of the same table row and seed the longer-trained one is kept, the other named."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from experiments.core.results import METRICS_LOG, RunResult
from experiments.core.rundir import CLOCK_FILE, LOCK_FILE
from experiments.pipelines.report import runs as rr
from experiments.pipelines.report import tables as mt


def _run(root: Path, sub: str, steps: int = 100, task: str = "image_classification",
         seed: int = 0, finished_at: str = "2026-01-01T00:00:00", value: float = 70.0) -> Path:  # fmt: skip
    run_dir = root / sub
    run_dir.mkdir(parents=True)
    RunResult(
        task=task, dataset="imagenet", model="deit_tiny_gap_patch16_224", normalizer="softmax",
        output_normalizer="softmax", seed=seed, metric_name="top1", metric_value=value,
        steps=steps, wall_seconds=1.0, finished_at=finished_at,
        config={"normalizer": {"name": "softmax"}, "registry": {"table": "imagenet_top1"}},
    ).write(run_dir)  # fmt: skip
    return run_dir


def _unfinished(root: Path, sub: str, steps: list[int]) -> Path:
    run_dir = root / sub
    run_dir.mkdir(parents=True)
    (run_dir / CLOCK_FILE).write_text('{"seconds": 3.0}\n')
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in steps]
    (run_dir / METRICS_LOG).write_text("\n".join(lines) + '\n{"step": 9')  # cut by a kill
    return run_dir


def test_of_two_runs_of_one_seed_the_longer_trained_is_kept_and_the_other_named(tmp_path):
    long = _run(tmp_path, "fifteen_epochs", steps=1500, value=72.0)
    short = _run(tmp_path, "two_epochs", steps=200, value=40.0, finished_at="2026-02-01T00:00:00")
    runs, notes = rr.load_runs([tmp_path])
    assert [r.run_dir for r in runs] == [long]
    assert notes == [
        f"{short / 'results.json'}: dropped, superseded by {long / 'results.json'} (same table "
        "row and seed), which trained longer (1500 vs 200 steps)"
    ]
    _, printed = mt.make_tables([tmp_path], tmp_path / "tables")
    assert notes[0] in printed
    assert "| 72.00" in (tmp_path / "tables" / "imagenet_top1.md").read_text()


def test_a_results_json_of_another_task_is_refused_in_one_line(tmp_path):
    _run(tmp_path, "vision", seed=0)
    foreign = _run(tmp_path, "copied_from_lm", seed=1, task="language_model")
    runs, notes = rr.load_runs([tmp_path])
    assert len(runs) == 1
    assert notes == [
        f"{foreign / 'results.json'}: refused, its task 'language_model' is not the task of "
        "table 'imagenet_top1' (image_classification); move it out of the runs given"
    ]


def test_unfinished_and_running_runs_are_listed_with_their_last_step(tmp_path):
    _run(tmp_path, "done")
    stopped = _unfinished(tmp_path, "multirun/3_seed=2", [5, 10])
    live = _unfinished(tmp_path, "multirun/4_seed=3", [5])
    fd = os.open(live / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        runs, notes = rr.load_runs([tmp_path])
    finally:
        os.close(fd)
    assert len(runs) == 1
    assert notes == [
        f"{stopped}: skipped, unfinished (last logged step 10, no results.json); rerun its "
        f"command with hydra.run.dir={stopped} to finish it",
        f"{live}: skipped, still running (last logged step 5)",
    ]
    (live / METRICS_LOG).unlink()
    assert f"{live}: skipped, unfinished (no step logged yet" in rr.load_runs([tmp_path])[1][1]

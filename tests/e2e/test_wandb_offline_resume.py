"""A vision run logging to W&B offline, killed with SIGKILL twice and resumed each time by the
same command: its offline folders are one W&B run (one id, name and job type, each part's
steps continuing the last checkpoint), the finished part holds the results, and the upload
command the app prints names every part (checked with ``wandb sync --dry-run``)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest

from experiments.core.results import METRICS_LOG, read_results
from tests.apps import SHORT_VISION, Background, run_app
from tests.wandb_records import finished_run, offline_runs


@pytest.mark.slow
def test_a_vision_run_killed_twice_is_one_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=deit_tiny_imagenet", *(a for a in SHORT_VISION if "logger=" not in a),
            "logger=wandb", "trainer.checkpoint_every_steps=5",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    for kill_at in ("step 15/22", "step 20/22"):  # each after a checkpoint (every 5 steps)
        app = Background.app("vision", args)
        app.wait_for(kill_at)
        app.kill()  # the app; W&B's service writes what it was sent, then ends (a kill of
        # the whole process group loses the rows the service had not written yet)
    done = run_app("vision", args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = read_results(run_dir / "results.json")
    last = finished_run(run_dir / "wandb")

    parts = offline_runs(run_dir / "wandb")
    for _ in range(300):  # the killed parts' services write their files on their own time
        if all(p.steps() for p in parts):
            break
        time.sleep(0.2)
        parts = offline_runs(run_dir / "wandb")
    assert len(parts) == 3 and [p.exited for p in parts] == [False, False, True]
    assert {p.run.run_id for p in parts} == {last.run.run_id}
    assert {(p.run.display_name, p.run.job_type) for p in parts} == {
        ("deit_tiny_imagenet-multimax-seed0", "train")}  # fmt: skip
    curve = [json.loads(x)["step"] for x in (run_dir / METRICS_LOG).read_text().splitlines()]
    logged = [p.steps() for p in parts]
    for before, after in zip(logged, logged[1:]):  # each part continues where one stopped
        assert before and after and after[0] <= before[-1] + 5 and after == sorted(after)
    assert sorted(set().union(*logged)) == sorted(set(curve)) and curve[-1] == 22
    assert json.loads(last.summary["test/top1"]) == pytest.approx(result.metric_value)
    assert f"results-{last.run.run_id}" in last.artifacts

    command = done.stdout.split("upload it with: ")[1].splitlines()[0]
    assert command.startswith("wandb sync ") and last.run.run_id in command
    dry = f"{shlex.quote(sys.executable)} -m wandb sync --dry-run {command.split(' ', 2)[2]}"
    out = subprocess.run(["bash", "-c", dry], capture_output=True, text=True, cwd=tmp_path)
    listed = [x for x in (out.stdout + out.stderr).splitlines() if x.strip().endswith(".wandb")]
    assert len(listed) == 3, out.stdout + out.stderr

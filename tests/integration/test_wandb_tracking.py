"""W&B as its users see it, with real W&B offline and its files read back: one metric
vocabulary, step axes and min/max summaries, job type, run name and group, the results as
summary, table and artifact, the checkpoint artifact only when asked for; and tables made
from W&B summaries in that vocabulary."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from experiments.core.results import METRICS_LOG, RESULTS_FILE, RunResult
from experiments.core.rundir import trim_metrics_log
from experiments.core.tracking import (
    finish_wandb,
    init_wandb,
    is_vocabulary,
    log_metrics,
    run_name,
    under,
)
from experiments.pipelines.report.wandb_runs import record_from_wandb
from tests.apps import Background, app_env
from tests.composition import compose
from tests.wandb_records import finished_run, offline_runs


def _result(**metrics) -> RunResult:
    return RunResult(task="image_classification", dataset="digits", model="deit", seed=1,
                     normalizer="multimax", output_normalizer="multimax", metric_name="top1",
                     metric_value=metrics["top1"], steps=20, wall_seconds=3.0,
                     metrics=metrics)  # fmt: skip


def _cfg(*overrides):
    cfg = compose("vision", ["experiment=deit_tiny_imagenet", "logger=wandb", "seed=1",
                             *overrides])  # fmt: skip
    OmegaConf.set_struct(cfg, False)
    return cfg


def test_every_pipeline_name_maps_into_one_vocabulary(tmp_path):
    assert under("val", {"val_loss": 1.0, "top1": 2.0, "ema_val_loss": 3.0}) == {
        "val/loss": 1.0, "val/top1": 2.0, "val/ema_loss": 3.0}  # fmt: skip
    assert under("val", {"valid_ppl": 9.0, "valid_eps_ppl": 8.0}) == {
        "val/ppl": 9.0, "val/eps_ppl": 8.0}  # fmt: skip
    assert all(map(is_vocabulary, ["train/loss", "val/top1", "test/bleu", "lr", "throughput"]))
    for old in ("train_loss", "top1", "images_per_s", "metrics/top1", "eval/task_error"):
        assert not is_vocabulary(old)
        with pytest.raises(ValueError, match="vocabulary"):
            log_metrics(tmp_path, 1, {old: 1.0})
    assert not (tmp_path / METRICS_LOG).exists()


def test_offline_run_logs_the_vocabulary_with_axes_summaries_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg("logger.log_checkpoint=true", "logger.group=sweep-a", "normalizer.order=1")
    # outside a Hydra app the task stands for the experiment (the apps: experiment=...)
    assert run_name(cfg) == "image_classification-multimax(order=1)-seed1"
    run = init_wandb(cfg, tmp_path)
    for step, (loss, top1) in enumerate([(2.0, 10.0), (1.5, 30.0), (1.8, 20.0)], start=1):
        log_metrics(tmp_path, step, {"train/loss": loss, "lr": 0.1, "throughput": 50.0}, run)
        log_metrics(tmp_path, step, under("val", {"val_loss": loss, "top1": top1}), run)
    result = _result(top1=20.0, top5=60.0)
    result.write(tmp_path, cfg)
    torch.save({"step": 3}, tmp_path / "checkpoint_last.pt")
    finish_wandb(run, result, tmp_path, tmp_path / "checkpoint_last.pt")

    logged = finished_run(tmp_path / "wandb")
    assert logged.run.job_type == "train" and logged.run.run_group == "sweep-a"
    assert logged.run.display_name == run_name(cfg)
    axes = {m.name or m.glob_name: m.step_metric for m in logged.metrics}
    assert axes["train/*"] == axes["val/*"] == axes["lr"] == axes["throughput"] == "step"
    goals = {m.name: (m.summary.min, m.summary.max) for m in logged.metrics if m.name}
    assert goals["val/loss"] == (True, False) and goals["val/top1"] == (False, True)
    assert logged.steps() == [1, 2, 3]
    assert all(row["_step"] == row["step"] for row in logged.history if "step" in row)
    keys = set().union(*logged.history)
    assert {"train/loss", "val/loss", "val/top1", "lr", "throughput"} <= keys
    assert json.loads(logged.summary["val/top1"]) == {"max": 30.0, "last": 20.0}
    assert json.loads(logged.summary["val/loss"])["min"] == 1.5
    assert json.loads(logged.summary["test/top1"]) == 20.0
    assert json.loads(logged.summary["test/top5"]) == 60.0
    assert json.loads(logged.summary["metric_name"]) == "top1"
    assert not [k for k in logged.summary if k.startswith("metrics/") or k in ("top1", "top5")]
    assert logged.files(f"results-{run.id}") == [METRICS_LOG, RESULTS_FILE]
    assert logged.files(f"model-{run.id}") == ["checkpoint_last.pt"]
    assert logged.artifacts[f"run-{run.id}-results"].type == "run_table"  # the results table
    assert json.loads(logged.summary["results/nrows"]) == 1


def test_the_checkpoint_is_uploaded_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = init_wandb(_cfg(), tmp_path)
    log_metrics(tmp_path, 1, {"train/loss": 1.0}, run)
    result = _result(top1=5.0)
    result.write(tmp_path)
    torch.save({"step": 1}, tmp_path / "checkpoint_last.pt")
    finish_wandb(run, result, tmp_path, tmp_path / "checkpoint_last.pt")
    logged = finished_run(tmp_path / "wandb")
    assert f"results-{run.id}" in logged.artifacts and f"model-{run.id}" not in logged.artifacts


def test_tables_read_w_and_b_summaries_in_the_vocabulary():
    config = {"task": "image_classification", "seed": 0, "model": {"name": "deit"},
              "normalizer": {"name": "softmax"}, "data": {"name": "imagenet"},
              "registry": {"table": "imagenet_top1", "metric": "top1"}}  # fmt: skip
    summary = {"metric_name": "top1", "test/top1": 71.5, "test/top5": 90.0,
               "val/top1": {"max": 72.0, "last": 71.5}, "_step": 20}  # fmt: skip
    record = record_from_wandb(config, summary)
    assert record["metric_value"] == 71.5
    assert record["metrics"] == {"top1": 71.5, "top5": 90.0}
    assert record_from_wandb(config, {"test/top5": 90.0})["metric_value"] is None


def _invocation(run_dir, cfg, steps, capsys) -> tuple[str, str]:
    """One invocation of a run: trim the curve to where it resumes (as RunDir does), log
    ``steps``, finish; (its W&B id, the upload command it printed)."""
    trim_metrics_log(run_dir, steps[0] - 1)
    run = init_wandb(cfg, run_dir)
    for step in steps:
        log_metrics(run_dir, step, {"train/loss": 1.0 / step}, run)
    finish_wandb(run)
    finished_run(run_dir / "wandb")
    printed = capsys.readouterr().out
    return run.id, printed.split("upload it with: ")[1].strip()


def test_a_resumed_offline_run_keeps_its_id_and_one_command_uploads_every_part(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = _cfg()
    first, command = _invocation(tmp_path, cfg, [1, 2, 3], capsys)
    again, command_again = _invocation(tmp_path, cfg, [3, 4], capsys)  # resumed after step 2
    assert again == first and command_again == command
    parts = offline_runs(tmp_path / "wandb")
    assert [p.run.run_id for p in parts] == [first, first]
    assert [p.steps() for p in parts] == [[1, 2, 3], [3, 4]]  # step 3 again: the same _step
    # a start-over (nothing to resume, the curve cleared) is a new run; the command that
    # uploads it leaves the superseded folders out
    fresh, fresh_command = _invocation(tmp_path, cfg, [1], capsys)
    assert fresh != first and fresh_command != command
    for shown, ids in ((command, (first, fresh)), (fresh_command, (fresh, first))):
        dry = f"{shlex.quote(sys.executable)} -m wandb sync --dry-run {shown.split(' ', 2)[2]}"
        out = subprocess.run(["bash", "-c", dry], capture_output=True, text=True, cwd=tmp_path)
        listed = [line for line in (out.stdout + out.stderr).splitlines() if ".wandb" in line]
        want = 2 if ids[0] == first else 1
        assert len(listed) == want and all(ids[0] in x and ids[1] not in x for x in listed), (
            out.stdout + out.stderr
        )


KILLED_RUN = """
import sys, time
from omegaconf import OmegaConf
from experiments.core.tracking import commit_metrics, init_wandb, log_metrics
cfg = OmegaConf.create({"task": "unit", "seed": 0, "normalizer": {"name": "softmax"},
                        "logger": {"name": "wandb", "mode": "offline", "job_type": "train",
                                   "flush_every_seconds": 0.5}})
run_dir = sys.argv[1]
run = init_wandb(cfg, run_dir)
log_metrics(run_dir, 1, {"train/loss": 2.0}, run)
log_metrics(run_dir, 2, {"train/loss": 1.0}, run)
log_metrics(run_dir, 2, {"val/loss": 1.5}, run)
commit_metrics(run)  # as the pipelines do before saving a checkpoint
commit_metrics(run)  # a second one adds nothing
log_metrics(run_dir, 3, {"train/loss": 0.5}, run)
print("checkpoint saved", flush=True)
time.sleep(600)
"""


def test_rows_up_to_a_checkpoint_survive_a_kill(tmp_path):
    app = Background([sys.executable, "-c", KILLED_RUN, str(tmp_path)], app_env())
    app.wait_for("checkpoint saved")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # W&B's service writes the file on its own time
        parts = offline_runs(tmp_path / "wandb")
        if parts and parts[0].steps()[:2] == [1, 2]:
            break
        time.sleep(0.2)
    app.kill(group=True)
    (killed,) = offline_runs(tmp_path / "wandb")
    assert not killed.exited and killed.steps()[:2] == [1, 2]
    assert {"train/loss", "val/loss"} <= set(killed.history[1])  # step 2: one row, both
    assert [row.get("_step") for row in killed.history] in (["1", "2"], ["1", "2", "3"])

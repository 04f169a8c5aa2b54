"""The apps on a real SLURM cluster (``scripts/slurm_cluster.sh start``: one node on this
machine): a ``launcher=slurm`` sweep whose job gets submitit's time-limit warning (SIGUSR2)
saves at its step, is requeued and ends on the uninterrupted run's number; ``scancel
--signal=TERM`` leaves a checkpoint at the step the job reached. The real time limit, for
vision and MT, under ``-m slow``. Skipped with the reason where no cluster answers."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.core.errors import INTERRUPTED_EXIT_CODE
from experiments.core.io import REPO_ROOT
from experiments.core.results import read_results
from tests.apps import SHORT_VISION, TINY_MT, Background, run_app

pytestmark = pytest.mark.slurm

# One CPU per job, no GPU, no memory request: the one-node cluster's jobs.
ON_THIS_NODE = [
    "launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null",
]
VISION = [o for o in SHORT_VISION if not o.startswith("trainer.log_every_steps=")]


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _wait_for_log(pattern: str, folder: Path, text: str, proc=None, job: str = "") -> Path:
    """The SLURM job log under ``folder`` matching ``pattern`` that shows ``text``; fails
    when the sweep (``proc``) or the ``job`` ends first."""
    while True:
        for log in folder.glob(pattern):
            if text in log.read_text(errors="replace"):
                return log
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {text!r}:\n{proc.output[-4000:]}")
        if job and not _sh("squeue", "-h", "-j", job).strip():
            logs = "".join(p.read_text(errors="replace") for p in folder.glob(pattern))
            raise AssertionError(f"job {job} ended before {text!r}:\n{logs[-4000:]}")
        time.sleep(0.5)


def _point_dir(sweep: Path, number: int) -> Path:
    """The run directory of multirun point ``number`` (``hydra.sweep.subdir``: N or N_...)."""
    (found,) = [p for p in sweep.iterdir() if p.name.split("_")[0] == str(number)]
    return found


def _job_done(job: str) -> str:
    """Wait until ``job`` has left the queue; its final state and exit code (sacct)."""
    while _sh("squeue", "-h", "-j", job).strip():
        time.sleep(1.0)
    while True:  # the accounting record follows shortly
        rows = _sh("sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode").split()
        if rows and not rows[0].startswith(("RUNNING", "PENDING", "REQUEUED")):
            return rows[0]
        time.sleep(1.0)


def test_warned_job_saves_is_requeued_and_ends_on_the_uninterrupted_number(tmp_path):
    """A sweep of two points that differ only in how often they print: point 0 gets SIGUSR2
    (what submitit asks SLURM to send ``signal_delay_s`` before the time limit) mid-epoch,
    saves, is requeued by submitit and resumes; point 1 runs uninterrupted beside it."""
    sweep = tmp_path / "sweep"
    bg = Background.app(
        "vision",
        ["-m", *VISION, "trainer.log_every_steps=5,11", *ON_THIS_NODE, f"hydra.sweep.dir={sweep}"],
    )
    log = _wait_for_log("**/*_log.out", sweep / ".submitit", "step 5/", bg.proc)
    job = log.parent.name
    _sh("scancel", "--signal=USR2", job)
    code = bg.finish()
    assert code == 0, bg.output[-4000:]
    out = log.read_text()
    stopped = re.search(r"stopped by SIGUSR2 at step (\d+); checkpoint saved", out)
    assert stopped, out[-4000:]
    assert f"at step {stopped.group(1)} (epoch 0" in out  # the requeued job resumed there
    warned, plain = (read_results(_point_dir(sweep, i) / "results.json") for i in (0, 1))
    assert warned.steps == plain.steps == 22
    assert warned.metric_value == pytest.approx(plain.metric_value, rel=1e-6)
    assert "REQUEUE" in _sh("sacct", "-n", "-P", "-D", "-j", job, "-o", "State")


def test_scancel_term_leaves_a_checkpoint_at_the_step_reached(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    command = [sys.executable, "-m", "experiments.vision", *VISION, "trainer.log_every_steps=5"]
    job = _sh(
        "sbatch", "--parsable", "--cpus-per-task=1", f"--chdir={REPO_ROOT}", f"--output={log}",
        "--wrap", "srun " + shlex.join([*command, f"hydra.run.dir={run_dir}"]),
    ).strip()  # fmt: skip
    _wait_for_log(log.name, log.parent, "step 5/", job=job)
    _sh("scancel", "--signal=TERM", job)
    state = _job_done(job)
    out = log.read_text()
    stopped = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved in (\S+) ", out)
    assert stopped, out[-4000:]
    assert Path(stopped.group(2)) == run_dir
    saved = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == int(stopped.group(1)) >= 5
    assert state.endswith(f"|{INTERRUPTED_EXIT_CODE}:0"), state
    assert not (run_dir / "results.json").exists()


# --- the real time limit: minutes per run, under -m slow -------------------------------------------

MT = [*TINY_MT, "normalizer=multimax", "train.max_update=120", "train.save_interval_updates=1000"]
TIME_LIMITED = {
    "vision": ("vision", [*VISION, "trainer.epochs=8", "trainer.log_every_steps=5"]),
    "mt": ("translation", MT),
}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["vision", "mt"])
def test_a_run_longer_than_its_time_limit_ends_on_the_uninterrupted_number(pipeline, tmp_path):
    """A 2-minute limit (the warning 30 s before it; SLURM sends it up to a minute early):
    the run goes through requeues and ends where the uninterrupted run ends."""
    app, overrides = TIME_LIMITED[pipeline]
    data = [f"data.root={tmp_path / 'data'}"] if pipeline == "mt" else []
    plain = run_app(app, [*overrides, *data, f"hydra.run.dir={tmp_path / 'plain'}"])
    assert plain.returncode == 0, plain.stdout[-4000:] + plain.stderr[-4000:]
    limits = ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30"]
    sweep = tmp_path / "sweep"
    proc = run_app(
        app, ["-m", *overrides, *data, *ON_THIS_NODE, *limits, f"hydra.sweep.dir={sweep}"]
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("**/*_log.out"))
    assert "stopped by SIGUSR2" in logs
    limited = read_results(_point_dir(sweep, 0) / "results.json")
    full = read_results(tmp_path / "plain" / "results.json")
    assert limited.steps == full.steps
    assert limited.metric_value == pytest.approx(full.metric_value, rel=1e-6)
    print(f"{pipeline}: time-limited {limited.metric_value} vs uninterrupted {full.metric_value}")

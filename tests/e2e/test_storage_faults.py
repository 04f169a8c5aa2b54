"""The vision app on a full disk and in directories it cannot write: one line naming the
path and what is needed, no temp file left, the previous checkpoint kept, and a rerun after
space is freed resumes. The full disk is a real file-size limit (``RLIMIT_FSIZE``, as
``ulimit -f`` sets it) on the app's process, so the tests run unprivileged too."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from experiments.core.io import REPO_ROOT
from experiments.core.results import read_results
from tests.apps import SHORT_VISION, TINY_LM, app_env, run_app

LIMIT_BYTES = 1_000_000  # below a smoke checkpoint (~2.5 MB), above every other file


def _limited_app(overrides: list[str], app: str = "vision") -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))

    cmd = [sys.executable, "-m", f"experiments.{app}", *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=app_env(), capture_output=True, text=True,
                          preexec_fn=limit)  # fmt: skip


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]


def _temp_files(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if ".tmp" in p.name)


@pytest.mark.slow
def test_an_unwritable_run_directory_stops_in_one_line(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    proc = run_app("vision", [*SHORT_VISION, f"hydra.run.dir={blocker}/run"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"ERROR: cannot write the run directory {blocker}/run: {blocker} is a file, not a "
        "folder; give hydra.run.dir=... a writable place"
    ]


def _closed(path: Path) -> Path:
    """The outermost folder on the way to ``path`` that others may not enter."""
    return next(p for p in [*reversed(path.parents), path] if not p.stat().st_mode & 0o001)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root")
def test_a_run_directory_without_write_permission_stops_in_one_line(tmp_path):
    tmp_path.chmod(0o700)  # pytest's folders: nobody may not even enter them
    shared = Path(tempfile.mkdtemp(prefix="multimax_faults_"))
    try:
        shared.chmod(0o755)  # root's: nobody may enter, not write
        (shared / "home").mkdir(mode=0o777)
        env = app_env(HOME=str(shared / "home"), PYTHONDONTWRITEBYTECODE="1")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        for parent, reason in [(shared, f"no write permission on {shared}"),
                               (tmp_path, f"no permission to enter {_closed(tmp_path)}")]:  # fmt: skip
            cmd = [*as_nobody, sys.executable, "-m", "experiments.vision", *SHORT_VISION,
                   f"hydra.run.dir={parent}/run"]  # fmt: skip
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            assert proc.returncode == 1, proc.stderr[-3000:]
            assert _errors(proc) == [
                f"ERROR: cannot write the run directory {parent}/run: {reason}; give "
                "hydra.run.dir=... a writable place"
            ], proc.stderr[-3000:]
    finally:
        shutil.rmtree(shared)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_the_last_and_the_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SHORT_VISION, "trainer.checkpoint_every_steps=4", f"hydra.run.dir={run_dir}"]
    first = run_app("vision", [*args, "trainer.stop_after_steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    full = _limited_app([*args, "trainer.stop_after_steps=8"])  # the save at step 8 fails
    assert full.returncode == 1
    assert _errors(full) == [line for line in full.stderr.splitlines() if line.strip()], (
        "nothing but the one line on stderr"
    )
    (error,) = _errors(full)
    assert f"cannot write {run_dir}/checkpoint_last.pt: the file-size limit" in error
    assert _temp_files(run_dir) == []
    last = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert last["step"] == 4
    resumed = run_app("vision", args)  # space freed: the same command resumes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at step 4" in resumed.stdout
    assert read_results(run_dir / "results.json").steps == 22
    assert _temp_files(run_dir) == []


@pytest.mark.slow
def test_a_full_disk_at_the_first_checkpoint_stops_in_one_line_and_leaves_no_temp_file(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SHORT_VISION, "trainer.checkpoint_every_steps=1", "trainer.stop_after_steps=1"]
    full = _limited_app([*args, f"hydra.run.dir={run_dir}"])
    assert full.returncode == 1
    (error,) = _errors(full)
    assert f"cannot write {run_dir}/checkpoint_last.pt: the file-size limit" in error
    assert "rerun the same command" in error
    assert _temp_files(run_dir) == [] and not (run_dir / "checkpoint_last.pt").exists()


@pytest.mark.slow
def test_a_full_disk_at_a_fairseq_checkpoint_stops_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_LM, "train.max_update=10", "train.save_interval_updates=5"]
    args += [f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}"]
    full = _limited_app(args, app="language_model")  # a ~2.8 MB checkpoint at update 5
    assert full.returncode == 1
    (error,) = _errors(full)
    assert error.startswith(
        f"ERROR: training stopped after update 5: cannot write a checkpoint in {run_dir}/"
        "checkpoints: the file-size limit was reached (ulimit -f); no checkpoint was saved yet."
    )
    assert _temp_files(run_dir) == []  # fairseq's checkpoint_last.pt.tmp removed

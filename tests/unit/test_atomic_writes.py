"""Writes under a full disk: a real file-size limit (``RLIMIT_FSIZE``, what ``ulimit -f``
sets; CPython ignores SIGXFSZ, so writes fail with EFBIG as on a full disk with ENOSPC)
around the real ``torch.save`` and text writes of ``experiments.core.io``."""

from __future__ import annotations

import contextlib
import errno
import resource
import subprocess
import sys

import pytest
import torch

from experiments.core.io import (
    WRITE_FAILED_EXIT_CODE,
    WriteFailed,
    atomic_write_text,
    require_writable,
    write_failure,
)
from experiments.core.rundir import (
    CHECKPOINT_LAST,
    CHECKPOINT_PREVIOUS,
    load_checkpoint,
    note_run_dir,
    save_checkpoint,
)
from experiments.core.tracking import init_wandb


@contextlib.contextmanager
def file_size_limit(n_bytes: int):
    """Files of this process may not grow beyond ``n_bytes`` inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _state(step: int, numbers: int) -> dict:
    return {"step": step, "weights": torch.arange(numbers, dtype=torch.float32)}


def _temp_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_a_checkpoint_too_big_for_the_disk_fails_in_one_line_and_keeps_the_last(tmp_path):
    save_checkpoint(_state(1, 1000), tmp_path)  # ~4 kB
    save_checkpoint(_state(2, 1000), tmp_path)
    with file_size_limit(64_000), pytest.raises(WriteFailed) as stop:
        save_checkpoint(_state(3, 100_000), tmp_path)  # ~400 kB
    message = str(stop.value)
    assert "\n" not in message and str(tmp_path / CHECKPOINT_LAST) in message
    assert "file-size limit" in message and "needs more than" in message
    assert stop.value.exit_code == WRITE_FAILED_EXIT_CODE
    assert isinstance(stop.value.__cause__, RuntimeError)  # torch's zip writer, wrapping EFBIG
    assert _temp_files(tmp_path) == []  # the partial file is gone
    assert load_checkpoint(tmp_path)["step"] == 2  # never renamed before the new one was whole
    assert torch.load(tmp_path / CHECKPOINT_PREVIOUS, weights_only=True)["step"] == 1
    save_checkpoint(_state(3, 100_000), tmp_path)  # space freed: the same save goes through
    assert load_checkpoint(tmp_path)["step"] == 3
    assert torch.load(tmp_path / CHECKPOINT_PREVIOUS, weights_only=True)["step"] == 2


def test_a_text_file_too_big_keeps_its_old_content_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "resolved_config.yaml"
    atomic_write_text(path, "old\n")
    with file_size_limit(1000), pytest.raises(WriteFailed, match="resolved_config.yaml: the"):
        atomic_write_text(path, "x" * 5000)
    assert path.read_text() == "old\n" and _temp_files(tmp_path) == []


def test_a_temp_file_of_a_killed_writer_goes_with_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    left = tmp_path / f".checkpoint_last.pt.tmp{dead}"
    left.write_bytes(b"half a checkpoint")
    save_checkpoint(_state(1, 10), tmp_path)
    assert not left.exists() and load_checkpoint(tmp_path)["step"] == 1


def test_each_failed_write_is_named_by_its_cause(tmp_path):
    target = tmp_path / "checkpoint_last.pt"
    full = write_failure(target, OSError(errno.ENOSPC, "No space left on device"), 5_000_000)
    assert "no space left on the device; it needs more than 5.0 MB" in str(full)
    denied = write_failure(target, PermissionError(errno.EACCES, "Permission denied"))
    assert f"write permission on {tmp_path} is needed" in str(denied)
    cut = write_failure(target, RuntimeError("[enforce fail at inline_container.cc:672] ."))
    assert "the write stopped short" in str(cut)


def test_a_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WriteFailed, match=f"{blocker} is a file, not a folder; give"):
        require_writable(blocker / "run", "the run directory", "give another")
    require_writable(tmp_path / "new" / "run", "the run directory", "unused")  # creatable


def test_a_run_directory_that_cannot_be_made_stops_before_hydra_makes_it(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        note_run_dir(blocker / "run")  # the config check's callback, before Hydra's mkdir
    assert stop.value.code == WRITE_FAILED_EXIT_CODE
    assert capsys.readouterr().err.splitlines() == [
        f"ERROR: cannot write the run directory {blocker}/run: {blocker} is a file, not a "
        "folder; give hydra.run.dir=... a writable place"
    ]


def test_a_wandb_directory_in_the_way_stops_before_wandb_starts(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "wandb").write_text("not a folder")
    cfg = OmegaConf.create({"logger": {"name": "wandb", "mode": "offline"}})
    with pytest.raises(WriteFailed, match="cannot write the W&B directory .*logger=none"):
        init_wandb(cfg, tmp_path)

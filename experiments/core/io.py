"""Files that are never half-written, writes that fail with one line, and the commit a
result came from.

Every file the suite writes goes through :func:`atomic_write_text` or
:func:`atomic_torch_save`: the data goes to a temp file beside the target
(``.<name>.tmp<pid>``) which is renamed over the target only once complete. When the write
fails (a full disk: ``ENOSPC``; a file-size limit, ``ulimit -f``: ``EFBIG``; a quota;
no permission) the temp file is removed, the target keeps its old content, and
:class:`WriteFailed` names the path and what is needed, in one line. Temp files that a
killed process left behind are removed by the next write of the same file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from experiments.core.errors import RunStop

REPO_ROOT = Path(__file__).resolve().parents[2]

# Exit code of a run stopped because a file could not be written (its last good state kept).
WRITE_FAILED_EXIT_CODE = 1

_NO_SPACE = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "the file-size limit was reached (ulimit -f)",
    errno.EDQUOT: "the disk quota is used up",
}
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteFailed(RunStop, OSError):
    """A file could not be written: one line naming the path and the space or permission
    it needs; exit code :data:`WRITE_FAILED_EXIT_CODE`."""

    def __init__(self, message: str) -> None:
        RunStop.__init__(self, message, WRITE_FAILED_EXIT_CODE)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, or in its chain: torch's zip writer reports a failed
    write as a RuntimeError whose context is the OSError)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def unwritable_reason(path: str | Path) -> str | None:
    """Why a file or folder at ``path`` cannot be created or written (None: it can): the
    nearest existing folder on its way lacks write permission, or is not a folder."""
    path = Path(path).absolute()
    for folder in reversed(path.parents):
        if folder.is_dir() and not os.access(folder, os.X_OK):
            return f"no permission to enter {folder}"
    target = path
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        return f"{target} is a file, not a folder"
    if not os.access(target, os.W_OK | os.X_OK):
        return f"no write permission on {target}"
    return None


def require_writable(path: str | Path, what: str, fix: str) -> None:
    """Stop with one line when ``path`` (a folder to create or write into) is not writable:
    ``cannot write <what> <path>: <why>; <fix>``."""
    reason = unwritable_reason(path)
    if reason is not None:
        raise WriteFailed(f"cannot write {what} {path}: {reason}; {fix}")


def write_failure(path: str | Path, err: BaseException, written: int = 0) -> WriteFailed:
    """The one-line :class:`WriteFailed` for a failed write of ``path`` (``written`` bytes
    reached the disk before it failed)."""
    path = Path(path)
    os_err = _os_error(err)
    code = os_err.errno if os_err is not None else None
    if code in _NO_PERMISSION:
        return WriteFailed(
            f"cannot write {path}: {os.strerror(code).lower()} (write permission on "
            f"{path.parent} is needed); make it writable or choose another directory"
        )
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    on_disk = f"{_megabytes(free)} free there" if free is not None else "free space unknown"
    why = _NO_SPACE.get(code) if code is not None else None
    if why is None and os_err is not None:
        why = os.strerror(code).lower()
    why = why or f"the write stopped short ({str(err).strip().splitlines()[0][:120]})"
    return WriteFailed(
        f"cannot write {path}: {why}; it needs more than {_megabytes(written)} ({on_disk}). "
        "Free space (or raise the limit) and rerun the same command: the file's previous "
        "version, if any, is kept"
    )


def _remove_stale_temp_files(path: Path) -> None:
    """Remove ``.<name>.tmp<pid>`` files beside ``path`` left by processes no longer alive."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``; removed if the block fails (its error then becomes a
    :class:`WriteFailed` when it is a failed write)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure(path, err) from err
    _remove_stale_temp_files(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
    except BaseException as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, RunStop) or (_os_error(err) is None and not _torch_write_error(err)):
            raise
        raise write_failure(path, err, written) from err


def _torch_write_error(err: BaseException) -> bool:
    """torch's zip writer failing on a short write, with no OSError attached."""
    return isinstance(err, RuntimeError) and "inline_container" in str(err)


def atomic_write(
    path: str | Path, write: Callable[[Path], None], keep_previous: str | Path | None = None
) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: never half-written. With
    ``keep_previous``, the current ``path`` moves there only once the new file is complete."""
    path = Path(path)
    with _temp_beside(path) as tmp:
        write(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename: never half-written."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj: Any, path: str | Path, keep_previous: str | Path | None = None) -> None:
    """``torch.save`` through a temp file and a rename (see :func:`atomic_write`)."""

    def save(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a Python file: a failed write keeps its errno
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, save, keep_previous)


def git_commit() -> str:
    """The repository's HEAD commit (with ``-dirty`` if the tree has changes), or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"

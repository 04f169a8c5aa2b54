"""Stopping on a signal: SIGTERM (``kill``, ``scancel``, a preemption, the end of a SLURM time
limit) and SIGUSR2 (submitit's warning ``signal_delay_s`` before the time limit).

The one mechanism every app uses. Around its training an app holds :func:`stop_at_step_ends`:
a stop signal then only marks the run (:func:`stop_requested`) and is passed on to the child
process groups that :func:`passing_stops_to` names (the fairseq trainer). The training loop
looks at the mark after each step; when it is set the app saves a checkpoint at that step and
calls :func:`exit_after_save`, which prints one line (the step, the resume command), hands
the signal to the handler that was there before (submitit's: requeue the job) and exits with
:data:`~experiments.core.errors.INTERRUPTED_EXIT_CODE`. The requeued job, or the printed
command, continues from that checkpoint onto the uninterrupted run's batches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

from experiments.core.errors import INTERRUPTED_EXIT_CODE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

_received: signal.Signals | None = None
_previous: dict[int, Any] = {}
_child_groups: list[int] = []


def _mark_stop(signum: int, _frame: FrameType | None) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum)
    for group in list(_child_groups):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


@contextlib.contextmanager
def stop_at_step_ends() -> Iterator[None]:
    """While inside: SIGTERM / SIGUSR2 mark the run for a stop at the next step end instead
    of ending the process. The handlers before are restored on leaving (outside the main
    thread, where Python cannot take signals, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _received
    _received = None
    for sig in STOP_SIGNALS:
        _previous[sig] = signal.signal(sig, _mark_stop)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            before = _previous.pop(sig, None)
            signal.signal(sig, signal.SIG_DFL if before is None else before)


def stop_requested() -> signal.Signals | None:
    """The stop signal received inside :func:`stop_at_step_ends`, or None."""
    return _received


@contextlib.contextmanager
def passing_stops_to(process_group: int) -> Iterator[None]:
    """While inside: a stop signal is passed on to ``process_group`` (a child that leads a
    group of its own and saves on the signal itself)."""
    _child_groups.append(process_group)
    try:
        if _received is not None:  # arrived before the child was started
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process_group, _received)
        yield
    finally:
        _child_groups.remove(process_group)


def stopped_line(step: int, saved: str, resume_hint: str) -> str:
    """The one line of a run stopped on a signal: which signal, the step, what was saved."""
    name = _received.name if _received is not None else "a stop signal"
    return f"stopped by {name} at step {step}; {saved}; {resume_hint}"


def exit_after_save(line: str) -> NoReturn:
    """Print ``line``, hand the signal to the handler there was before :func:`stop_at_step_ends`
    (under submitit: requeue the job and exit), and exit with ``INTERRUPTED_EXIT_CODE``."""
    print(line, flush=True)
    sys.stdout.flush()
    before = _previous.get(_received) if _received is not None else None
    if callable(before):
        before(int(_received), None)
    sys.exit(INTERRUPTED_EXIT_CODE)

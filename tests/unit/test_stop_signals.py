"""The one stop-on-signal mechanism (experiments.core.signals) with real signals and real
processes, and the resume command's quoting for Hydra's override grammar."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from experiments.core import signals
from experiments.core.errors import INTERRUPTED_EXIT_CODE
from experiments.core.io import REPO_ROOT
from experiments.core.rundir import hydra_quoted
from tests.apps import wait_dead


@pytest.mark.parametrize("sig", signals.STOP_SIGNALS)
def test_a_stop_signal_only_marks_the_run_and_handlers_come_back(sig):
    before = signal.getsignal(sig)
    with signals.stop_at_step_ends():
        assert signals.stop_requested() is None
        os.kill(os.getpid(), sig)  # delivered before the next bytecode: the process lives on
        assert signals.stop_requested() == sig
    assert signal.getsignal(sig) == before


def test_the_signal_is_passed_on_to_a_child_group():
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with signals.stop_at_step_ends(), signals.passing_stops_to(child.pid):
            os.kill(os.getpid(), signal.SIGTERM)
            assert child.wait() == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    assert wait_dead([child.pid]) == []


def test_exit_after_save_prints_the_line_calls_the_handler_before_and_exits_with_its_code():
    """The handler there was before (submitit's requeue) still runs, after the save."""
    script = textwrap.dedent(
        """
        import os, signal
        from experiments.core import signals
        signal.signal(signal.SIGUSR2, lambda s, f: print("requeue by the handler before", s))
        with signals.stop_at_step_ends():
            os.kill(os.getpid(), signal.SIGUSR2)
            signals.exit_after_save(signals.stopped_line(7, "checkpoint saved", "to resume: X"))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert proc.returncode == INTERRUPTED_EXIT_CODE, proc.stderr
    assert proc.stdout.splitlines() == [
        "stopped by SIGUSR2 at step 7; checkpoint saved; to resume: X",
        f"requeue by the handler before {int(signal.SIGUSR2)}",
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/runs/plain-1.2_x",
        "/runs/with space",
        "/runs/it's",
        "/runs/ümlaut/日本",
        "/runs/a,b=c",
        "/runs/${oc.env:HOME}",
        "/runs/back\\slash\\",
        "/runs/\\'both",
        '/runs/"double"',
        "/runs/~*?[]{}#!",
    ],
)
def test_hydra_quoted_reads_back_unchanged(path):
    value = OverridesParser.create().parse_override(f"hydra.run.dir={hydra_quoted(path)}").value()
    assert OmegaConf.create({"dir": value}).dir == path  # interpolations resolved as Hydra does

"""How a run stops on purpose: one line for the user, no traceback, a known exit code."""

from __future__ import annotations

# Exit code of a run stopped on purpose (non-finite loss) with its last good checkpoint kept.
STOP_EXIT_CODE = 3
# Exit code of a run refused before it started (bad input, run dir in use).
USAGE_EXIT_CODE = 2
# Exit code of a run stopped by SIGTERM / SIGUSR2 after saving a checkpoint at its current step
# (experiments.core.signals): rerunning the printed command continues it.
INTERRUPTED_EXIT_CODE = 4

# --- stopping a run with one line -----------------------------------------------------------


class RunStop(Exception):
    """Ends a run with one line for the user (no traceback) and ``exit_code``."""

    def __init__(self, message: str, exit_code: int = USAGE_EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(RunStop, ValueError):
    """A configured value the run cannot use: one line naming the key and the fix."""

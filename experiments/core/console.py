"""What a run prints: the project's own lines by default, third-party output on
``verbose=true``, and the dry-run cost report."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from experiments.core.setup import fidelity_label

VERBOSE_ENV = "MULTIMAX_VERBOSE"
# Warnings issued by any module but the project's own (those keep Python's default filters).
_NOT_OUR_MODULES = r"(?!(experiments|multimax|scripts)(\.|$))"


def verbose() -> bool:
    """Whether third-party output is wanted (``verbose=true``; children inherit it)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def configure_output(verbose: bool = False) -> None:
    """The default output of an app is the project's own progress lines: third-party
    warnings, log records below ERROR and progress bars (datasets, subword-nmt) are kept out
    of it; ``verbose=true`` shows them. Child processes inherit the choice."""
    import logging

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if verbose:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        logging.getLogger().setLevel(logging.INFO)
        return
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # bars of libraries; ours pass disable= themselves
    warnings.filterwarnings("ignore", module=_NOT_OUR_MODULES)
    logging.getLogger().setLevel(logging.ERROR)
    if "datasets" in sys.modules:  # read the variable at import: tell it now as well
        sys.modules["datasets"].disable_progress_bars()


def fidelity_line(fidelity: Mapping[str, Any] | None) -> str:
    """The dry run's line naming what the run reproduces (``configs/fidelity/``)."""
    label = fidelity_label(fidelity) or "paper"
    name = (fidelity or {}).get("name", "paper")
    what = {"paper": "the paper's text", "authors": "the authors' code"}.get(name, name)
    return f"  fidelity:          {label} ({what}; docs/fidelity.md)"


def dry_run_report(
    *,
    task: str,
    parameters: int,
    items_per_step: int,
    item_name: str,
    step_seconds: float,
    total_steps: int,
    device: torch.device,
    world_size: int = 1,
) -> str:
    """The lines printed by ``dry_run=true``: what the full schedule would cost.

    ``step_seconds`` is the measured time of one optimiser step on this device (after a
    warm-up step); the estimate assumes the same step time on every device of the job.
    """
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        memory = f"{peak:.2f} GiB peak allocated on {torch.cuda.get_device_name(device)}"
    else:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        memory = f"{rss:.2f} GiB peak resident (CPU)"
    hours = step_seconds * total_steps / 3600
    lines = [
        f"[dry run] {task}",
        f"  parameters:        {parameters:,}",
        f"  {item_name} per step:  {items_per_step:,} (world size {world_size})",
        f"  peak memory:       {memory}",
        f"  step time:         {step_seconds:.3f} s on {device.type}",
        f"  full schedule:     {total_steps:,} steps ≈ {hours:.1f} h wall on this device",
    ]
    text = "\n".join(lines)
    print(text)
    return text

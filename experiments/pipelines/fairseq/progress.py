"""fairseq's training progress, read from its ``--log-format json`` records, turned into our
progress lines, ``metrics.jsonl`` and W&B.

fairseq logs ``<time> | INFO | <name> | <JSON>``: ``train_inner`` every ``--log-interval``
updates (``{"epoch": 1, "update": 0.417, "loss": "7.595", ..., "num_updates": "15"}``),
``valid`` after each validation (keys ``valid_loss``, ``valid_ppl``, ...), and, from
``fairseq-validate``, one record named after the subset (``test_loss``, ...). Values are
strings of numbers (``"inf"`` included). Checkpoint loads and saves are plain log messages.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from experiments.core.rundir import RunDir
from experiments.core.tracking import commit_metrics, log_metrics, under


def parse_log_record(line: str) -> tuple[str, dict[str, Any]] | None:
    """(logger name, record) of a fairseq ``--log-format json`` line, or None for any other.

    fairseq's apps log ``<time> | INFO | <name> | {...}``; under Python's default logging
    format (fairseq's training ``main`` called from another program) it is
    ``INFO:<name>:{...}``."""
    start = line.find("{")
    if start < 0:
        return None
    try:
        record = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return re.split(r"[|:]", line[:start].rstrip(" |:"))[-1].strip(), record


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric values as floats (fairseq writes them as strings)."""
    out = {}
    for key, value in record.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def train_metrics(line: str) -> dict[str, float] | None:
    """The metrics of a ``train_inner`` record, or of a ``valid`` record (keys ``valid_*``);
    None for any other line."""
    parsed = parse_log_record(line)
    if parsed is None:
        return None
    name, record = parsed
    if name == "train_inner":
        return numbers(record)
    if name == "valid":
        return {k: v for k, v in numbers(record).items() if k.startswith("valid_")}
    return None


def train_losses(train_log: Path) -> dict[int, float]:
    """{update: training loss} from the ``train_inner`` records of a ``train.log``."""
    losses = {}
    for line in train_log.read_text().splitlines():
        parsed = parse_log_record(line)
        if parsed is not None and parsed[0] == "train_inner":
            values = numbers(parsed[1])
            losses[int(values["num_updates"])] = values["loss"]
    return losses


# Validation metrics kept in metrics.jsonl, results.json and W&B (eps_ppl / zero_prob: the
# plugin criterion's, on the evaluation distribution).
VALID_METRICS = ("valid_loss", "valid_ppl", "valid_eps_ppl", "valid_zero_prob")


class TrainProgress:
    """Turns fairseq's training log into our progress lines, ``metrics.jsonl`` and W&B."""

    def __init__(self, prefix: str, run: RunDir, max_update: int, wandb_run=None) -> None:
        self.prefix, self.run, self.max_update = prefix, run, max_update
        self.run_dir = run.path
        self.wandb_run = wandb_run
        self.start = time.time()
        self.first_update: int | None = None
        self.num_updates = 0
        self.resumed_from: int | None = None
        self.wps: list[float] = []
        self.last_valid: dict[str, float] = {}

    def __call__(self, line: str) -> None:
        loaded = re.search(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", line)
        if loaded:
            self.resumed_from = self.num_updates = int(loaded.group(2))
            print(f"[{self.prefix}] resumed from {loaded.group(1)} @ update {self.num_updates}")
        saved = re.search(r"Saved checkpoint (\S+) \(epoch \d+ @ (\d+) updates", line)
        if saved:
            commit_metrics(self.wandb_run)  # W&B's rows up to the checkpoint, into its file
            self.num_updates = max(self.num_updates, int(saved.group(2)))
            print(f"[{self.prefix}] checkpoint saved @ update {saved.group(2)}", flush=True)
        self.run.tick(min_interval=5.0)
        metrics = train_metrics(line)
        if not metrics:
            return
        step = int(metrics.get("num_updates", metrics.get("valid_num_updates", self.num_updates)))
        if "loss" in metrics:
            self._train(step, metrics)
        else:
            self.num_updates = max(self.num_updates, step)
            self.last_valid = metrics
            shown = " | ".join(f"{k[6:]} {metrics[k]:.3f}" for k in VALID_METRICS if k in metrics)
            print(f"[{self.prefix}] valid @ update {step} | {shown}", flush=True)
            keep = {k: v for k, v in metrics.items() if k in VALID_METRICS}
            log_metrics(self.run_dir, step, under("val", keep), self.wandb_run)

    def _train(self, step: int, metrics: dict[str, float]) -> None:
        self.num_updates = step
        if self.first_update is None:
            self.first_update, self.start = step, time.time()
            eta = ""
        else:
            rate = (step - self.first_update) / max(time.time() - self.start, 1e-9)
            left = max(self.max_update - step, 0) / rate if rate > 0 else math.inf
            eta = f" | ETA {left:.0f} s" if math.isfinite(left) else ""
        wps = metrics.get("wps", 0.0)
        self.wps.append(wps)
        total = f"/{self.max_update}" if self.max_update else ""
        print(
            f"[{self.prefix}] update {step}{total} | loss {metrics.get('loss', math.nan):.3f} | "
            f"ppl {metrics.get('ppl', math.nan):.2f} | {wps:,.0f} tokens/s | "
            f"lr {metrics.get('lr', math.nan):.2e}{eta}",
            flush=True,
        )
        # fairseq's names -> the vocabulary of experiments.core.tracking
        names = {"loss": "train/loss", "ppl": "train/ppl", "gnorm": "train/gnorm", "lr": "lr",
                 "wps": "throughput"}  # fmt: skip
        keep = {names[k]: metrics[k] for k in names if k in metrics}
        log_metrics(self.run_dir, step, keep, self.wandb_run)

    @property
    def tokens_per_second(self) -> float:
        """Median training throughput (target tokens per second) over this invocation."""
        if not self.wps:
            return math.nan
        values = sorted(self.wps[1:] or self.wps)  # the first interval includes start-up
        return values[len(values) // 2]

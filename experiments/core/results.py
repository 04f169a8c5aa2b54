"""``results.json``: one typed record per run, written and read by the same class (strict
JSON: non-finite numbers become null with their reason)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.core.io import atomic_write_text, git_commit

RESULTS_FILE = "results.json"
# Training curves, one JSON object per line (written by tracking.log_metrics).
METRICS_LOG = "metrics.jsonl"


@dataclass
class RunResult:
    """The contents of every run's ``results.json`` (INTERFACES.md)."""

    task: str
    dataset: str
    model: str
    normalizer: str
    output_normalizer: str
    seed: int
    metric_name: str
    metric_value: float | None
    steps: int
    wall_seconds: float
    profile: str = "paper"
    metrics: dict[str, float | None] = field(default_factory=dict)
    null_reasons: dict[str, str] = field(default_factory=dict)
    git_commit: str = field(default_factory=git_commit)
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    config: dict = field(default_factory=dict)


def finite_or_null(
    values: Mapping[str, Any], reasons: Mapping[str, str] | None = None
) -> tuple[dict[str, float | None], dict[str, str]]:
    """(values with every non-finite number as None, why each None is None): strict JSON
    has no NaN or Infinity. ``reasons`` names the cause where the caller knows it."""
    reasons = dict(reasons or {})
    out: dict[str, float | None] = {}
    why: dict[str, str] = {}
    for key, value in values.items():
        if value is None or not math.isfinite(float(value)):
            out[key] = None
            why[key] = reasons.get(key) or ("not measured" if value is None else f"was {value}")
        else:
            out[key] = float(value)
    return out, why


def write_results(run_dir: str | Path, result: RunResult, cfg: DictConfig | None = None) -> Path:
    """Atomically write ``results.json`` in ``run_dir`` as strict JSON (non-finite numbers
    become null, their reason in ``null_reasons``); ``cfg`` is stored resolved."""
    if cfg is not None:
        result.config = OmegaConf.to_container(cfg, resolve=True)
    reasons = dict(result.null_reasons)
    result.metrics, why = finite_or_null(result.metrics, reasons)
    headline, headline_why = finite_or_null({"metric_value": result.metric_value}, reasons)
    result.metric_value = headline["metric_value"]  # type: ignore[assignment]
    result.null_reasons = {**why, **headline_why}  # only the values that are null
    path = Path(run_dir) / RESULTS_FILE
    text = json.dumps(asdict(result), indent=2, sort_keys=False, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def read_results(path: str | Path) -> RunResult:
    """Read a ``results.json``; raises ``ValueError`` naming the file if it is broken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return RunResult(**data)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: not a valid {RESULTS_FILE} ({err})") from err

"""``results.json``: one typed record per run, written and read by the same class (strict
JSON: non-finite numbers become null with their reason).

    path = RunResult(task=..., ...).write(run_dir, cfg)   # atomically, cfg stored resolved
    result = RunResult.read(path)                         # ValueError naming a broken file
    result.table                                          # its table: config registry.table
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.core.io import atomic_write_text, git_commit

RESULTS_FILE = "results.json"
# Training curves, one JSON object per line (written by tracking.log_metrics).
METRICS_LOG = "metrics.jsonl"


@dataclass
class RunResult:
    """The contents of every run's ``results.json``: what ran (task, dataset, model, the
    attention and output normalisers, seed, profile), its headline metric and every other
    metric, and the resolved config (whose ``registry`` block names the run's table)."""

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
    fidelity: str = "paper"  # configs/fidelity/: the paper's text or the authors' code
    metrics: dict[str, float | None] = field(default_factory=dict)
    null_reasons: dict[str, str] = field(default_factory=dict)
    git_commit: str = field(default_factory=git_commit)
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    config: dict = field(default_factory=dict)

    @property
    def registry(self) -> dict[str, Any]:
        """The experiment's ``registry:`` block as the run stored it ({} for a run made
        before experiments declared one)."""
        block = (self.config or {}).get("registry")
        return dict(block) if isinstance(block, Mapping) else {}

    @property
    def table(self) -> str | None:
        """The results table the run belongs to (``registry.table``), or None."""
        table = self.registry.get("table")
        return str(table) if table else None

    def normalizer_options(self) -> dict[str, Any]:
        """The attention normaliser's options from the stored config ({} when it has none,
        or when the config names another normaliser)."""
        options = (self.config or {}).get("normalizer")
        if not isinstance(options, Mapping) or options.get("name", self.normalizer) != (
            self.normalizer
        ):
            return {}
        return {k: v for k, v in options.items() if k != "name"}

    def write(self, run_dir: str | Path, cfg: DictConfig | None = None) -> Path:
        """Atomically write ``run_dir/results.json`` as strict JSON (non-finite numbers
        become null, their reason in ``null_reasons``); ``cfg`` is stored resolved."""
        if cfg is not None:
            self.config = OmegaConf.to_container(cfg, resolve=True)
            self.fidelity = str((self.config.get("fidelity") or {}).get("name", self.fidelity))
        reasons = dict(self.null_reasons)
        self.metrics, why = finite_or_null(self.metrics, reasons)
        headline, headline_why = finite_or_null({"metric_value": self.metric_value}, reasons)
        self.metric_value = headline["metric_value"]
        self.null_reasons = {**why, **headline_why}  # only the values that are null
        path = Path(run_dir) / RESULTS_FILE
        text = json.dumps(asdict(self), indent=2, sort_keys=False, allow_nan=False)
        atomic_write_text(path, text + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        """The record in ``path``; a ``ValueError`` naming the file if it is broken."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid {RESULTS_FILE} ({err})") from err

    @classmethod
    def from_dict(cls, data: Any) -> RunResult:
        """A record from a ``results.json``-shaped mapping; ``ValueError`` says what is
        missing or unknown."""
        if not isinstance(data, Mapping):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [k for k in required if k not in data]
        unknown = sorted(set(data) - known)
        if missing or unknown:
            what = f"missing field(s) {', '.join(missing)}" if missing else ""
            what += "; " if missing and unknown else ""
            what += f"unknown field(s) {', '.join(unknown)}" if unknown else ""
            raise ValueError(what)
        return cls(**data)


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
    """:meth:`RunResult.write` (the run directory's call)."""
    return result.write(run_dir, cfg)


def read_results(path: str | Path) -> RunResult:
    """:meth:`RunResult.read`."""
    return RunResult.read(path)

"""The mechanism study's runs and the statistics its tables and figures share: one record
per run (normaliser label, training N, m, seed, metrics, inspect.json), grouped by
(normaliser, N, m), mean ± std over seeds and the paired comparison of two normalisers."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from experiments.pipelines.report.runs import load_runs as load_results
from experiments.pipelines.report.runs import normalizer_label

# The order of the normalisers in every table and figure (labels as normalizer_label gives them).
ORDER = [
    "softmax",
    "softmax(learn_temperature=True)",
    "sparsemax",
    "entmax15",
    "evsoftmax",
    "multimax(order=1)",
    "multimax",
    "sigmoid",
    "softpick",
    "ssmax",
    "softmax_sink",
    "entmax_alpha",
    "stickbreaking",
]
METRICS = ["task_error", "residual_mass", "modes_kept", "min_max_ratio", "num_modes", "entropy"]
# (metric, True if larger is better) for the win/tie/loss comparison.
COMPARED = [("task_error", False), ("residual_mass", False), ("modes_kept", True)]


def load_runs(root: Path) -> list[dict]:
    """One record per mechanism results.json under ``root``: label, sizes, metrics and
    inspect.json; a broken file is reported by path and skipped."""
    found, problems = load_results([root])
    for line in problems:
        print(f"[mechanism_study] {line}", file=sys.stderr)
    runs = []
    for run in found:
        result = run.result
        if result.task != "mechanism":
            continue
        data = result.config["data"]
        inspect_path = run.run_dir / "inspect.json"
        runs.append(
            {
                "normalizer": normalizer_label(result.normalizer, result.normalizer_options()),
                "train_n": int(data["num_items"]),
                "m": int(data["num_relevant"]),
                "seed": int(result.seed),
                "profile": result.profile,
                "steps": int(result.steps),
                "wall_seconds": float(result.wall_seconds),
                "metrics": result.metrics,
                "eval_n": sorted(
                    {int(k[1:].split("/")[0]) for k in result.metrics if k.startswith("N")}
                ),
                "inspect": json.loads(inspect_path.read_text()) if inspect_path.exists() else None,
            }
        )
    if not runs:
        raise SystemExit(f"[mechanism_study] no mechanism results.json under {root}")
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def cell(runs: list[dict], metric: str, eval_n: int | None = None) -> dict[int, float]:
    """seed -> value of ``metric`` (at the training N, or at ``eval_n``)."""
    out = {}
    for r in runs:
        n = r["train_n"] if eval_n is None else eval_n
        key = f"N{n}/{metric}"
        if key in r["metrics"]:
            out[r["seed"]] = float(r["metrics"][key])
    return out


def group(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["normalizer"], r["train_n"], r["m"])].append(r)
    return groups


def normalizers_in(runs: list[dict]) -> list[str]:
    present = {r["normalizer"] for r in runs}
    return [n for n in ORDER if n in present] + sorted(present - set(ORDER))


def compare(a: dict[int, float], b: dict[int, float], larger_better: bool) -> tuple[str, float]:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf  # one seed: no verdict
    if abs(mean) <= max(2 * se, 0.01):
        return "ties", mean
    better = mean > 0 if larger_better else mean < 0
    return ("beats" if better else "loses"), mean

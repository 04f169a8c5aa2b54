"""Runs read from the W&B API instead of run directories (``make_tables --from-wandb``): each
finished run's config (the resolved Hydra config, ``registry`` block included) and summary
become the mapping a ``results.json`` holds. The summary names metrics as
``experiments.core.tracking`` logs them: ``results.json``'s metrics as ``test/<name>``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

SUMMARY_FIELDS = ("task", "dataset", "model", "normalizer", "output_normalizer", "seed",
                  "profile", "metric_name", "metric_value", "steps", "wall_seconds")  # fmt: skip


def record_from_wandb(config: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """A ``results.json``-shaped mapping from a W&B run's config and summary: summary fields
    named as in ``results.json`` win; otherwise they come from the config, the headline
    metric's name from ``evaluate.metric`` or the experiment's ``registry.metric``, and its
    value from the summary's entry of that name."""
    model = config.get("model") or {}
    normalizer = config.get("normalizer") or {}
    profile = config.get("profile") or {}
    numbers = {k: v for k, v in summary.items() if isinstance(v, int | float)}
    record: dict[str, Any] = {
        "task": config.get("task"),
        "dataset": (config.get("data") or {}).get("name", ""),
        "model": model.get("name"),
        "normalizer": normalizer.get("name"),
        "output_normalizer": model.get("output_normalizer") or normalizer.get("name"),
        "seed": config.get("seed"),
        "profile": profile.get("name", "paper"),
        "metric_name": None,
        "metric_value": None,
        "steps": int(numbers.get("_step", 0)),
        "wall_seconds": float(numbers.get("_runtime", 0.0)),
        "metrics": _final_metrics(numbers),
        "config": dict(config),
    }
    record.update({k: v for k, v in summary.items() if k in SUMMARY_FIELDS})
    if not record["metric_name"]:
        evaluate = config.get("evaluate") or {}
        record["metric_name"] = evaluate.get("metric") or (config.get("registry") or {}).get(
            "metric"
        )
    name = record["metric_name"]
    if record["metric_value"] is None and name:
        for key in (f"test/{name}", name):
            if isinstance(summary.get(key), int | float):
                record["metric_value"] = summary[key]
                break
    return record


def _final_metrics(numbers: Mapping[str, float]) -> dict[str, float]:
    """``results.json``'s metrics from a summary: its ``test/<name>`` entries (a run logged
    before that vocabulary: every number not starting with ``_``)."""
    final = {k.removeprefix("test/"): v for k, v in numbers.items() if k.startswith("test/")}
    return final or {k: v for k, v in numbers.items() if not k.startswith("_")}


def records_from_wandb(project: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(("wandb:PROJECT/ID", record) per finished run, one line per skipped run) of the W&B
    runs of ``ENTITY/PROJECT`` (needs network and a login)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise SystemExit(
            f"--from-wandb needs the W&B API, but WANDB_MODE={mode}. Run online "
            "(unset WANDB_MODE, `wandb login`), after `wandb sync` of the offline runs; or "
            "pass the run directories instead: make_tables.py runs/ --out results/"
        )
    try:
        import wandb  # optional: only --from-wandb needs it

        api_runs = list(wandb.Api(timeout=30).runs(project))
    except Exception as err:  # noqa: BLE001 - any API failure means: tell the user how to fix it
        raise SystemExit(
            f"--from-wandb {project}: could not read runs from the W&B API ({err}). Check the "
            "network, `wandb login` and the ENTITY/PROJECT path, or pass run directories."
        ) from err
    records, problems = [], []
    for r in api_runs:
        where = f"wandb:{project}/{r.id}"
        if r.state != "finished":
            problems.append(f"{where}: skipped, state {r.state}")
            continue
        records.append((where, record_from_wandb(r.config, dict(r.summary))))
    return records, problems

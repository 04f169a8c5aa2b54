"""The mechanism study's report: its runs (every mechanism ``results.json`` under a
directory, with the run's ``inspect.json``) as tables in results/mechanism/ (Markdown and
CSV), and the figures of ``study_figures``.

    summary             every held-out metric at the training N, mean ± std over seeds
    by_eval_n           the trained models at every held-out N
    multimax_vs_others  MultiMax against each normaliser, paired by seed, per cell
    learned_normalizers the learned normaliser scalars of every run
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pandas as pd

from experiments.core.io import REPO_ROOT
from experiments.pipelines.mechanism.study_figures import figures
from experiments.pipelines.mechanism.study_stats import (
    COMPARED,
    METRICS,
    ORDER,
    cell,
    compare,
    group,
    load_runs,
    mean_std,
    normalizers_in,
)
from experiments.pipelines.report.render import to_markdown

DEFAULT_OUT = REPO_ROOT / "results" / "mechanism"


def fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def write_table(out: Path, name: str, header: list[str], rows: list[list[str]], note: str) -> None:
    """``out/<name>.csv`` and ``out/<name>.md`` (``note``, then the table)."""
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame.to_csv(out / f"{name}.csv", index=False, lineterminator="\n")
    (out / f"{name}.md").write_text(f"{note}\n\n{to_markdown(frame)}\n")


def tables(runs: list[dict], out: Path, banner: str) -> None:
    groups = group(runs)
    names = normalizers_in(runs)
    keys = sorted({(k[1], k[2]) for k in groups})
    # 1. At the training N: every metric, mean ± std over seeds.
    header = ["normalizer", "train N", "m", "seeds", *METRICS]
    rows = []
    for train_n, m in keys:
        for name in names:
            rs = groups.get((name, train_n, m))
            if not rs:
                continue
            seeds = " ".join(str(s) for s in sorted(r["seed"] for r in rs))
            vals = [fmt(*mean_std(list(cell(rs, k).values()))) for k in METRICS]
            rows.append([name, str(train_n), str(m), seeds, *vals])
    write_table(
        out,
        "summary",
        header,
        rows,
        f"{banner}Held-out metrics at the training N, mean ± std over seeds "
        "(task_error = MSE / Var(y); ideal: 0, residual 0, modes_kept 1, min_max_ratio 1, "
        "num_modes = m, entropy = ln m).",
    )
    # 2. Against the evaluation N.
    header = ["normalizer", "train N", "m", "eval N", "task_error", "residual_mass", "modes_kept"]
    rows = []
    for train_n, m in keys:
        for name in names:
            rs = groups.get((name, train_n, m))
            if not rs:
                continue
            for n in rs[0]["eval_n"]:
                vals = [fmt(*mean_std(list(cell(rs, k, n).values()))) for k, _ in COMPARED]
                rows.append([name, str(train_n), str(m), str(n), *vals])
    write_table(
        out,
        "by_eval_n",
        header,
        rows,
        f"{banner}The trained models measured at every held-out N (trained at 'train N'); "
        "mean ± std over seeds.",
    )
    # 3. MultiMax against each other normaliser: paired over seeds (same held-out data).
    header = ["multimax", "vs", "metric", "beats", "ties", "loses", "cells (m, eval N): diff"]
    rows = []
    for mm in [n for n in names if n.startswith("multimax")]:
        for other in [n for n in names if n != mm]:
            for metric, larger_better in COMPARED:
                verdicts, details = defaultdict(int), []
                for train_n, m in keys:
                    a_runs, b_runs = groups.get((mm, train_n, m)), groups.get((other, train_n, m))
                    if not a_runs or not b_runs:
                        continue
                    for n in a_runs[0]["eval_n"]:
                        verdict, diff = compare(
                            cell(a_runs, metric, n), cell(b_runs, metric, n), larger_better
                        )
                        verdicts[verdict] += 1
                        details.append(f"({m},{n}): {diff:+.3f}{verdict[0]}")
                rows.append(
                    [
                        mm,
                        other,
                        metric,
                        str(verdicts["beats"]),
                        str(verdicts["ties"]),
                        str(verdicts["loses"]),
                        " ".join(details),
                    ]
                )
    write_table(
        out,
        "multimax_vs_others",
        header,
        rows,
        f"{banner}MultiMax against each normaliser, per cell (m, eval N): diff = mean over seeds "
        "of (multimax − other), paired by seed (both see the same held-out data). 'beats' / "
        "'loses' when |mean diff| > 2 × its standard error over seeds and > 0.01, else 'ties'. "
        "Suffix b/t/l = beats/ties/loses.",
    )


def learned_table(runs: list[dict], out: Path, banner: str) -> None:
    """The learned normaliser scalars of every run (σ's b, d, a, c; a learned temperature)."""
    header = ["normalizer", "train N", "m", "seed", "parameters"]
    rows = []
    for r in sorted(
        runs,
        key=lambda r: (
            ORDER.index(r["normalizer"]) if r["normalizer"] in ORDER else 99,
            r["train_n"],
            r["m"],
            r["seed"],
        ),
    ):
        params = (r["inspect"] or {}).get("normalizer_parameters") or {}
        if not params:
            continue
        text = "; ".join(
            f"{k} " + (" ".join(f"{x:+.3f}" for x in v) if isinstance(v, list) else f"{v:.3f}")
            for k, v in params.items()
        )
        rows.append([r["normalizer"], str(r["train_n"]), str(r["m"]), str(r["seed"]), text])
    write_table(
        out,
        "learned_normalizers",
        header,
        rows,
        f"{banner}Learned normaliser scalars. MultiMax: σ(x) = x + Σ_k a_k relu(b_k − x)^k + "
        "c_k relu(x − d_k)^k with b = low_threshold, d = high_threshold, a = low_coef, "
        "c = high_coef (order 1: slope 1 − a below b, 1 + c above d).",
    )


def report(root: Path, out: Path) -> None:
    runs = load_runs(root)
    out.mkdir(parents=True, exist_ok=True)
    smoke = any(r["profile"] == "smoke" for r in runs)
    banner = "SMOKE RESULTS (pipeline check, not a study). " if smoke else ""
    tables(runs, out, banner)
    learned_table(runs, out, banner)
    figures(runs, out, banner)
    meta_path = root / "study.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(
        {
            "runs": len(runs),
            "runs_dir": os.path.relpath(root, REPO_ROOT),
            "steps": sorted({r["steps"] for r in runs}),
            "run_wall_seconds_total": round(sum(r["wall_seconds"] for r in runs), 1),
        }
    )
    (out / "study.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"[mechanism_study] {len(runs)} runs -> tables and figures in {out}", flush=True)

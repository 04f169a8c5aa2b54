"""The mechanism study: run its Hydra multirun grid, then regenerate results/mechanism/.

    .venv/bin/python -m scripts.mechanism_study                      # the default grid
    .venv/bin/python -m scripts.mechanism_study profile=smoke        # any Hydra override
    .venv/bin/python -m scripts.mechanism_study --report-only runs/mechanism/study/<time>

The grid (normalisers × training N × m × seeds) is ``study`` in
configs/experiment/mechanism_retrieval.yaml: one multirun of ``experiments.mechanism`` per
normaliser entry (``normalizer.order`` exists only for multimax, so the entries cannot be one
sweep axis). Tables and figures are made from the runs' results.json / inspect.json only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from experiments.core.io import REPO_ROOT

DEFAULT_OUT = REPO_ROOT / "results" / "mechanism"
ORDER = [
    "softmax",
    "softmax_learned_temp",
    "sparsemax",
    "entmax15",
    "evsoftmax",
    "multimax_order1",
    "multimax_order2",
]
METRICS = ["task_error", "residual_mass", "modes_kept", "min_max_ratio", "num_modes", "entropy"]
# (metric, True if larger is better) for the win/tie/loss comparison.
COMPARED = [("task_error", False), ("residual_mass", False), ("modes_kept", True)]


# --- running the grid -----------------------------------------------------------------------


def compose_study(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO_ROOT / "configs"), version_base="1.3"):
        return compose("mechanism", overrides=overrides)


def slug(entry: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", entry.replace("normalizer=", "")).strip("_")


def run_grid(root: Path, overrides: list[str], jobs: int) -> None:
    """One ``experiments.mechanism -m`` per normaliser entry, ``jobs`` at a time."""
    cfg = compose_study(overrides)
    study = cfg.study
    axes = [
        "data.num_items=" + ",".join(str(n) for n in study.num_items),
        "data.num_relevant=" + ",".join(str(m) for m in study.num_relevant),
        "seed=" + ",".join(str(s) for s in study.seeds),
    ]
    per_entry = len(study.num_items) * len(study.num_relevant) * len(study.seeds)
    entries = list(study.normalizers)
    print(
        f"[mechanism_study] {len(entries)} normalisers x {per_entry} runs "
        f"(N={list(study.num_items)} m={list(study.num_relevant)} seeds={list(study.seeds)}) "
        f"-> {root}",
        flush=True,
    )
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    start = time.perf_counter()
    pending, running, done = list(entries), [], 0
    while pending or running:
        while pending and len(running) < jobs:
            entry = pending.pop(0)
            log = (root / f"{slug(entry)}.log").open("w")
            cmd = [
                sys.executable,
                "-m",
                "experiments.mechanism",
                "-m",
                *entry.split(),
                *axes,
                f"hydra.sweep.dir={root / slug(entry)}",
                *overrides,
            ]
            log.write(" ".join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
            running.append((entry, proc, log))
        time.sleep(0.5)
        for item in list(running):
            entry, proc, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                tail = (root / f"{slug(entry)}.log").read_text()[-3000:]
                raise SystemExit(f"[mechanism_study] {entry} failed:\n{tail}")
            done += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (len(entries) - done)
            print(
                f"[mechanism_study] {done}/{len(entries)} {entry}: {per_entry} runs; "
                f"elapsed {elapsed:.0f}s, ETA {eta:.0f}s",
                flush=True,
            )
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    meta = {
        "overrides": overrides,
        "normalizers": entries,
        "train_num_items": list(study.num_items),
        "num_relevant": list(study.num_relevant),
        "seeds": list(study.seeds),
        "eval_num_items": list(cfg.eval.num_items),
        "jobs": jobs,
        "wall_seconds": round(time.perf_counter() - start, 1),
        # CPU time of all runs: wall time on idle cores ≈ cpu_seconds / cores (load-free size).
        "cpu_seconds": round(cpu.ru_utime + cpu.ru_stime, 1),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
    }
    (root / "study.json").write_text(json.dumps(meta, indent=2) + "\n")


# --- reading the runs -----------------------------------------------------------------------


def label_of(config: dict) -> str:
    norm = config["normalizer"]
    if norm["name"] == "softmax" and norm.get("learn_temperature"):
        return "softmax_learned_temp"
    if norm["name"] == "multimax":
        return f"multimax_order{norm.get('order', 2)}"
    return norm["name"]


def load_runs(root: Path) -> list[dict]:
    """One record per results.json under ``root``: labels, sizes, metrics, inspect.json."""
    runs = []
    for path in sorted(root.rglob("results.json")):
        data = json.loads(path.read_text())
        if data.get("task") != "mechanism":
            continue
        config = data["config"]
        inspect_path = path.with_name("inspect.json")
        runs.append(
            {
                "normalizer": label_of(config),
                "train_n": int(config["data"]["num_items"]),
                "m": int(config["data"]["num_relevant"]),
                "seed": int(data["seed"]),
                "profile": data.get("profile", ""),
                "steps": int(data["steps"]),
                "wall_seconds": float(data["wall_seconds"]),
                "metrics": data["metrics"],
                "eval_n": sorted(
                    {int(k[1:].split("/")[0]) for k in data["metrics"] if k.startswith("N")}
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


# --- tables ---------------------------------------------------------------------------------


def fmt(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def write_table(out: Path, name: str, header: list[str], rows: list[list[str]], note: str) -> None:
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


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


def compare(a: dict[int, float], b: dict[int, float], larger_better: bool) -> tuple[str, float]:
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs)
    se = std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf  # one seed: no verdict
    if abs(mean) <= max(2 * se, 0.01):
        return "ties", mean
    better = mean > 0 if larger_better else mean < 0
    return ("beats" if better else "loses"), mean


# --- figures --------------------------------------------------------------------------------


def save(fig, out: Path, name: str) -> None:
    fig.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")


def figures(runs: list[dict], out: Path, banner: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(runs)
    names = normalizers_in(runs)
    train_ns = sorted({r["train_n"] for r in runs})
    ms = sorted({r["m"] for r in runs})
    train_n = train_ns[0]
    colors = {m: plt.cm.viridis(i / max(len(ms) - 1, 1) * 0.85) for i, m in enumerate(ms)}

    # Error and residual mass against the held-out N, one column per normaliser.
    fig, axes = plt.subplots(
        2, len(names), figsize=(2.6 * len(names), 5.2), sharex=True, sharey="row"
    )
    axes = axes.reshape(2, len(names))
    for j, name in enumerate(names):
        for m in ms:
            rs = groups.get((name, train_n, m))
            if not rs:
                continue
            ns = rs[0]["eval_n"]
            for i, metric in enumerate(("task_error", "residual_mass")):
                stats = [mean_std(list(cell(rs, metric, n).values())) for n in ns]
                axes[i, j].errorbar(
                    ns,
                    [s[0] for s in stats],
                    yerr=[s[1] for s in stats],
                    marker="o",
                    ms=3,
                    capsize=2,
                    color=colors[m],
                    label=f"m={m}",
                )
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].set_xscale("log", base=2)
        axes[1, j].set_xlabel("N (held-out)")
        for ax in axes[:, j]:
            ax.axvline(train_n, color="0.8", lw=0.8, zorder=0)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("task error (MSE / Var y)")
    axes[1, 0].set_ylabel("residual mass")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"{banner}Trained at N={train_n} (grey line); mean ± std over seeds "
        f"{sorted({r['seed'] for r in runs})}",
        fontsize=10,
    )
    save(fig, out, "error_residual_vs_n")
    plt.close(fig)

    # Modes kept against m, one panel per normaliser.
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), 5.0), sharey="row")
    axes = axes.reshape(2, len(names))
    for j, name in enumerate(names):
        for i, metric in enumerate(("modes_kept", "num_modes")):
            stats = [
                mean_std(list(cell(groups[(name, train_n, m)], metric).values()))
                for m in ms
                if (name, train_n, m) in groups
            ]
            present = [m for m in ms if (name, train_n, m) in groups]
            axes[i, j].errorbar(
                present, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3
            )
            ideal = [1.0] * len(present) if metric == "modes_kept" else present
            axes[i, j].plot(present, ideal, "k--", lw=0.8, label="ideal")
            axes[i, j].set_xticks(ms)
            axes[i, j].grid(alpha=0.3)
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].set_xlabel("m (relevant items)")
    axes[0, 0].set_ylabel("modes kept (share of relevant\nitems >= 0.5 x top relevant)")
    axes[1, 0].set_ylabel("modes in the whole row\n(p >= 0.5 x max)")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{banner}At N={train_n}; mean ± std over seeds", fontsize=10)
    save(fig, out, "modes_kept_vs_m")
    plt.close(fig)

    sigma_figure(runs, out, banner, plt)
    attention_rows_figure(runs, out, banner, plt)


def sigma_figure(runs: list[dict], out: Path, banner: str, plt) -> None:
    """Learned σ of trained MultiMax models next to the identity, over their raw scores."""
    import torch

    from multimax import modulate

    mm = [n for n in ORDER if n.startswith("multimax") and any(r["normalizer"] == n for r in runs)]
    ms = sorted({r["m"] for r in runs})
    if not mm:
        return
    seed = min(r["seed"] for r in runs)
    fig, axes = plt.subplots(
        len(mm), len(ms), figsize=(3.4 * len(ms), 3.0 * len(mm)), squeeze=False
    )
    for i, name in enumerate(mm):
        for j, m in enumerate(ms):
            ax = axes[i][j]
            run = next(
                (r for r in runs if r["normalizer"] == name and r["m"] == m and r["seed"] == seed),
                None,
            )
            if run is None or run["inspect"] is None:
                ax.set_visible(False)
                continue
            ins = run["inspect"]
            rel, dis = ins["relevant_scores"], ins["distractor_scores"]
            lo, hi = min(rel + dis), max(rel + dis)
            pad = 0.15 * (hi - lo)
            x = torch.linspace(lo - pad, hi + pad, 400)
            params = ins["normalizer_parameters"]
            sigma = modulate(
                x,
                *(
                    torch.tensor(params[k])
                    for k in ("low_threshold", "high_threshold", "low_coef", "high_coef")
                ),
            )
            ax.plot(x, x, "k--", lw=0.8, label="identity")
            ax.plot(x, sigma, color="C3", lw=1.8, label="learned σ")
            ymin, ymax = ax.get_ylim()
            bins = 40
            ax2 = ax.twinx()
            ax2.hist(dis, bins=bins, color="0.6", alpha=0.5, density=True, label="distractor")
            ax2.hist(rel, bins=bins, color="C0", alpha=0.5, density=True, label="relevant")
            ax2.set_yticks([])
            ax.set_zorder(ax2.get_zorder() + 1)
            ax.patch.set_visible(False)
            for k in range(len(params["low_threshold"])):
                ax.axvline(params["low_threshold"][k], color="C2", lw=0.6, ls=":")
                ax.axvline(params["high_threshold"][k], color="C1", lw=0.6, ls=":")
            ax.set_title(f"{name}, m={m}, seed {seed}", fontsize=9)
            ax.set_xlabel("raw score q·k/√d")
            if j == 0:
                ax.set_ylabel("σ(score)")
            if i == 0 and j == 0:
                handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
                labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
                ax.legend(handles, labels, fontsize=7, loc="upper left")
    fig.suptitle(
        f"{banner}Learned σ (red) vs identity\nhistograms: held-out raw scores of relevant "
        "(blue) and distractor (grey) items; dotted: thresholds b (green), d (orange)",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, out, "sigma_learned")
    plt.close(fig)


def attention_rows_figure(runs: list[dict], out: Path, banner: str, plt, examples: int = 3):
    """The same held-out examples' attention rows under each trained normaliser."""
    names = normalizers_in(runs)
    seed = min(r["seed"] for r in runs)
    ms = sorted({r["m"] for r in runs})
    m = 2 if 2 in ms else ms[-1]
    chosen = {
        r["normalizer"]: r["inspect"]
        for r in runs
        if r["seed"] == seed and r["m"] == m and r["inspect"] is not None
    }
    names = [n for n in names if n in chosen]
    if not names:
        return
    k = min(examples, len(chosen[names[0]]["attention"]))
    fig, axes = plt.subplots(
        k, len(names), figsize=(2.6 * len(names), 1.9 * k), sharey="row", squeeze=False
    )
    for j, name in enumerate(names):
        ins = chosen[name]
        for i in range(k):
            row = ins["attention"][i][0]  # head 0
            rel = ins["relevant"][i]
            ax = axes[i][j]
            ax.bar(
                range(len(row)),
                row,
                width=1.0,
                color=["C3" if r else "0.55" for r in rel],
            )
            ax.axhline(1.0 / m, color="k", lw=0.6, ls="--")
            residual = sum(p for p, r in zip(row, rel, strict=True) if not r)
            ax.text(
                0.98, 0.95, f"residual {residual:.2f}", transform=ax.transAxes, ha="right",
                va="top", fontsize=7,
            )  # fmt: skip
            if i == 0:
                ax.set_title(name, fontsize=9)
            if i == k - 1:
                ax.set_xlabel("item")
            if j == 0:
                ax.set_ylabel(f"example {i}\nweight")
    fig.suptitle(
        f"{banner}Attention rows on the same held-out examples (N={len(row)}, m={m}, seed "
        f"{seed}); red: relevant items, dashed: the ideal 1/m",
        fontsize=9,
    )
    fig.tight_layout()
    save(fig, out, "attention_rows")
    plt.close(fig)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every run (default adds logger=none)"
    )
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default: timestamped)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="tables + figures folder")
    parser.add_argument("--jobs", type=int, default=2, help="normaliser multiruns in parallel")
    parser.add_argument("--report-only", type=Path, help="only regenerate from this runs dir")
    args = parser.parse_args(argv)
    if args.report_only:
        report(args.report_only, args.out)
        return
    if not any(o.startswith("logger=") for o in args.overrides):
        # W&B offline start-up costs seconds per run; pass logger=wandb to log the study.
        args.overrides = ["logger=none", *args.overrides]
    root = args.runs_dir or REPO_ROOT / "runs" / "mechanism" / "study" / time.strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    start = time.perf_counter()
    run_grid(root, args.overrides, args.jobs)
    report(root, args.out)
    print(f"[mechanism_study] total {time.perf_counter() - start:.0f}s", flush=True)

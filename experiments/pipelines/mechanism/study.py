"""The mechanism study: run its Hydra multirun grid, then regenerate results/mechanism/.

    .venv/bin/python -m scripts.mechanism_study                      # the default grid
    .venv/bin/python -m scripts.mechanism_study profile=smoke        # any Hydra override
    .venv/bin/python -m scripts.mechanism_study --report-only runs/mechanism/study/<time>

The grid (normalisers × training N × m × seeds) is ``study`` in
configs/experiment/mechanism_retrieval.yaml: one multirun of ``experiments.mechanism`` per
normaliser entry (``normalizer.order`` exists only for multimax, so the entries cannot be one
sweep axis). Tables and figures are made from the runs' results.json / inspect.json only
(``study_report``, ``study_figures``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from experiments.core.io import REPO_ROOT
from experiments.pipelines.mechanism.study_report import DEFAULT_OUT, report

__all__ = ["main", "report", "run_grid"]


def compose_study(overrides: list[str]):
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

"""``make demo``: the whole suite, end to end, on two CPU cores in minutes.

    python -m scripts.demo [--normalizers softmax,multimax] [--pipelines vision,lm,mt,mechanism]

1. the simplex figure (``scripts.simplex_figure``) into ``results/figures/``;
2. the smoke profile of every pipeline present (vision, language model, translation, and the
   mechanism study) for each normaliser, one run directory each under ``runs/demo/``, one
   progress line per run (a pipeline whose entry point is not in the checkout yet is skipped
   with a message);
3. the tables (``scripts/make_tables.py``) and figures (``experiments/analyze.py``) of those
   runs into ``results/smoke/``, with ``results/smoke/README.md`` pointing at them.

Smoke runs show that every pipeline runs end to end; their numbers are NOT comparable to
the paper, and every table and figure says so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from experiments.core import registry
from experiments.core.io import REPO_ROOT, atomic_write_text
from experiments.core.results import RESULTS_FILE, RunResult
from experiments.pipelines.report.figures import analyze_runs
from experiments.pipelines.report.render import fmt_value, to_markdown
from experiments.pipelines.report.runs import normalizer_label
from experiments.pipelines.report.simplex import main as simplex_figure
from experiments.pipelines.report.tables import make_tables


@dataclass(frozen=True)
class Pipeline:
    """One pipeline's smoke run: the app and experiment whose ``registry.demo`` names it."""

    key: str
    title: str
    module: str
    overrides: tuple[str, ...]

    @property
    def entry_point(self) -> Path:
        return REPO_ROOT / (self.module.replace(".", "/") + ".py")


def pipelines() -> tuple[Pipeline, ...]:
    """The demo's pipelines, in table order: every experiment with a ``demo`` entry in its
    registry block, run with ``profile=smoke``."""
    demos = [e for e in registry.experiments().values() if e.demo_key]
    return tuple(
        Pipeline(
            e.demo_key,
            e.demo_title or e.demo_key,
            e.module,
            (f"experiment={e.name}", "profile=smoke"),
        )
        for e in sorted(demos, key=lambda e: (e.table_order, e.name))
    )


@dataclass
class Outcome:
    pipeline: str
    normalizer: str
    run_dir: Path
    status: str  # "ok", "failed", "reused"
    seconds: float
    summary: str = ""


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_smoke(
    pipeline: Pipeline,
    normalizer: str,
    run_dir: Path,
    extra: Sequence[str] = (),
    reuse: bool = False,
) -> Outcome:
    """One smoke run in ``run_dir`` (a fresh one unless ``reuse`` and it finished before);
    its output goes to ``run_dir/demo.log``."""
    results = run_dir / RESULTS_FILE
    if reuse and results.exists():
        try:  # the wall time the run took when it was made
            seconds = float(RunResult.read(results).wall_seconds)
        except (ValueError, TypeError):
            seconds = 0.0
        return Outcome(pipeline.key, normalizer, run_dir, "reused", seconds, _summary(results))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", pipeline.module, *pipeline.overrides,
           f"normalizer={normalizer}", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    start = time.perf_counter()
    with (run_dir / "demo.log").open("w") as log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not results.exists():
        tail = (run_dir / "demo.log").read_text().splitlines()[-25:]
        why = f"exit code {proc.returncode}" if proc.returncode else "no results.json written"
        return Outcome(pipeline.key, normalizer, run_dir, "failed", seconds,
                       why + "\n" + "\n".join("      " + line for line in tail))  # fmt: skip
    return Outcome(pipeline.key, normalizer, run_dir, "ok", seconds, _summary(results))


def _summary(results: Path) -> str:
    try:
        result = RunResult.read(results)
        return f"{result.metric_name} {float(result.metric_value):.4g} after {result.steps} steps"
    except (ValueError, TypeError) as err:
        return f"unreadable results.json ({err})"


def write_readme(out: Path, outcomes: Sequence[Outcome], skipped: Sequence[str],
                 total: float) -> Path:  # fmt: skip
    """``out/README.md``: what the demo ran and where its tables and figures are."""
    lines = [
        "# Smoke results (`make demo`)",
        "",
        "> SMOKE RESULTS: tiny models trained for minutes on small local data on a CPU. They "
        "show that every pipeline runs end to end; they are NOT comparable to the paper.",
        "",
        f"Generated by `python -m scripts.demo` in {_duration(total)} (min:s; the runs' own "
        f"wall times add up to {_duration(sum(o.seconds for o in outcomes))}, reused runs "
        "included); do not edit.",
        "",
        "| pipeline | normaliser | status | wall (min:s) | result | run directory |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        summary = o.summary.splitlines()[0] if o.summary else ""
        rel = os.path.relpath(o.run_dir, REPO_ROOT)
        lines.append(f"| {o.pipeline} | {o.normalizer} | {o.status} | {_duration(o.seconds)} "
                     f"| {summary} | `{rel}` |")  # fmt: skip
    if skipped:
        lines += [""] + [f"- skipped: {s}" for s in skipped]
    lines += ["", "Tables: [tables.md](tables.md) (one `.md`, `.csv` and `.tex` per table). "
              "Figures: [figures/figures.md](figures/figures.md). The simplex figure: "
              "[../figures/simplex.png](../figures/simplex.png).", ""]  # fmt: skip
    path = out / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# --- the smoke table of README.md and docs/results.md, written from results/smoke/ ----------

SMOKE_BEGIN = (
    "<!-- smoke-results: written by `python -m scripts.demo` from results/smoke/; do not edit -->"
)
SMOKE_END = "<!-- /smoke-results -->"
# Files that show the smoke table (between the two markers), rewritten by every demo.
SMOKE_TABLE_FILES = ("README.md", "docs/results.md")
SMOKE_CSV_COLUMNS = ["model", "dataset", "normalizer", "output_normalizer", "metric_name", "mean"]


def smoke_table(results: Path) -> str:
    """The smoke results as one Markdown table (a row per pipeline, a column per normaliser)
    and the demo's wall time, from the tables and README ``make demo`` wrote in ``results``."""
    found = [results / f"{key}_smoke.csv" for key in registry.tables()]
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in found if p.exists()]
    rows = pd.concat(frames) if frames else pd.DataFrame(columns=SMOKE_CSV_COLUMNS)
    rows = rows.assign(
        pipeline=rows["model"] + " (" + rows["dataset"] + ")",
        label=[normalizer_label(n, output=o) for n, o in zip(rows["normalizer"],
                                                             rows["output_normalizer"], strict=True)],
        mean=rows["mean"].astype(float),
    )  # fmt: skip
    table = rows.pivot_table(
        index=["pipeline", "metric_name"],
        columns="label",
        values="mean",
        aggfunc="last",
        sort=False,
    )
    table = table.map(lambda v: "—" if pd.isna(v) else fmt_value(v)).reset_index()
    table = table.rename(columns={"pipeline": "pipeline (smoke data)", "metric_name": "metric"})
    lines = [to_markdown(table)]
    readme = results / "README.md"
    text = readme.read_text() if readme.exists() else ""
    took = re.search(r"Generated by `python -m scripts.demo` in (\d+:\d\d)", text)
    runs = len(re.findall(r"^\| \w+ \| \S+ \| (?:ok|reused) \|", text, re.M))
    if took:
        lines += ["", f"`make demo` made these {runs} runs in {took.group(1)} (min:s, tables and "
                  "figures included; seed 0 only, so the differences are not significant)."]  # fmt: skip
    return "\n".join(lines)


def with_smoke_table(text: str, table: str) -> str:
    """``text`` with the part between the smoke markers replaced by ``table``."""
    start, end = text.index(SMOKE_BEGIN) + len(SMOKE_BEGIN), text.index(SMOKE_END)
    return text[:start] + "\n" + table + "\n" + text[end:]


def write_smoke_tables(results: Path) -> list[Path]:
    """Rewrite the smoke table of every file in :data:`SMOKE_TABLE_FILES`."""
    table = smoke_table(results)
    written = []
    for name in SMOKE_TABLE_FILES:
        path = REPO_ROOT / name
        text = path.read_text()
        if SMOKE_BEGIN in text and with_smoke_table(text, table) != text:
            atomic_write_text(path, with_smoke_table(text, table))
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    known = pipelines()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--normalizers",
        default="softmax,multimax",
        help="comma list of configs/normalizer names (default softmax,multimax)",
    )
    parser.add_argument(
        "--pipelines",
        default=",".join(p.key for p in known),
        help="comma list of: " + ", ".join(p.key for p in known),
    )
    parser.add_argument("--runs-dir", default="runs/demo")
    parser.add_argument("--out", default="results/smoke", help="tables and figures")
    parser.add_argument("--figures", default="results/figures", help="the simplex figure")
    parser.add_argument("--no-simplex", action="store_true", help="skip the simplex figure")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep runs that finished in an earlier demo instead of rerunning",
    )
    parser.add_argument(
        "--logger",
        default="none",
        choices=["wandb", "none"],
        help="W&B logging of the runs (offline) or none",
    )
    args = parser.parse_args(argv)  # fmt: skip
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    runs_dir, out = (REPO_ROOT / args.runs_dir).resolve(), (REPO_ROOT / args.out).resolve()
    normalizers = [n for n in args.normalizers.split(",") if n]
    wanted = [k for k in args.pipelines.split(",") if k]
    unknown = set(wanted) - {p.key for p in known}
    if unknown:
        parser.error(f"unknown pipeline(s) {', '.join(sorted(unknown))}")

    print("[demo] simplex figure", flush=True)
    if args.no_simplex:
        print("[demo]   skipped (--no-simplex)")
    else:
        for path in simplex_figure(REPO_ROOT / args.figures):
            print(f"[demo]   wrote {os.path.relpath(path, REPO_ROOT)}")

    skipped, todo = [], []
    for p in known:
        if p.key not in wanted:
            continue
        if not p.entry_point.exists():
            rel = os.path.relpath(p.entry_point, REPO_ROOT)
            skipped.append(f"{p.key} ({p.title}): {rel} is not in this checkout yet")
            print(f"[demo] skipping {p.key}: {rel} is not in this checkout yet", flush=True)
            continue
        todo += [(p, n) for n in normalizers]

    outcomes: list[Outcome] = []
    for i, (p, n) in enumerate(todo, start=1):
        prefix = f"[demo {i}/{len(todo)} {_duration(time.perf_counter() - start)}]"
        run_dir = runs_dir / f"{p.key}_{n}"
        if not (args.reuse and (run_dir / RESULTS_FILE).exists()):
            print(f"{prefix} {p.key} {n}: smoke run ... (log: {run_dir}/demo.log)", flush=True)
        o = run_smoke(p, n, run_dir, (f"logger={args.logger}",), args.reuse)
        outcomes.append(o)
        print(f"{prefix} {p.key} {n}: {o.status} in {_duration(o.seconds)}: {o.summary}",
              flush=True)  # fmt: skip

    finished = [o.run_dir for o in outcomes if o.status in ("ok", "reused")]
    print(f"[demo] tables -> {os.path.relpath(out, REPO_ROOT)}/", flush=True)
    make_tables(finished, out)
    print(f"[demo] figures -> {os.path.relpath(out / 'figures', REPO_ROOT)}/", flush=True)
    analyze_runs(finished, out / "figures")
    total = time.perf_counter() - start
    readme = write_readme(out, outcomes, skipped, total)
    if out == (REPO_ROOT / "results" / "smoke").resolve():  # the committed results only
        for path in write_smoke_tables(out):
            print(f"[demo] smoke table -> {os.path.relpath(path, REPO_ROOT)}", flush=True)
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"[demo] done in {_duration(total)}: {len(outcomes) - len(failed)} runs ok, "
          f"{len(failed)} failed, {len(skipped)} pipelines skipped; see "
          f"{os.path.relpath(readme, REPO_ROOT)}")  # fmt: skip
    if args.logger == "wandb" and finished:
        rel = os.path.relpath(runs_dir, REPO_ROOT)
        print(
            f"[demo] W&B runs are offline; upload them with: wandb sync {rel}/*/wandb/offline-run-*"
        )
    return 1 if failed else 0

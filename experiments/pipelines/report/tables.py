"""Results tables from runs: every number comes from a run's ``results.json`` (or W&B).

    python scripts/make_tables.py RUNS_DIR... --out results/
    python scripts/make_tables.py --from-wandb ENTITY/PROJECT --out results/

Finds every ``results.json`` under the given directories (Hydra single-run and multirun
layouts alike); a run's table is the one its experiment declares (``registry.table`` in the
stored config; title, metric label, direction, extra metrics and order from
``experiments.core.registry``). Runs are grouped by table × profile × model × dataset ×
attention normaliser × output normaliser, seeds aggregated (mean ± sample std, n) and written
per table as Markdown, CSV and LaTeX, with the paper's value from
``results/paper_reference.json`` (null → "n/a") and the difference to the softmax row of the
same model; per row a 95 % confidence interval and a paired test against that softmax row
(p, ``*`` below 0.05) from the runs' per-example records (``significance``). Runs of a
profile other than ``paper`` (e.g. ``smoke``) go to separate, clearly
labelled tables (``<table>_<profile>.*``). Broken or partial ``results.json`` files, and runs
whose config names no table, are reported by path and skipped; a seed that appears twice in
one group keeps the newest run and reports the older one.

One module of ~400 lines on purpose: runs → DataFrame → grouped rows → the three formats
and the index read as one sequence; rendering lives in ``render``, loading in ``runs``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.core import registry
from experiments.core.io import REPO_ROOT, atomic_write_text
from experiments.core.results import RunResult
from experiments.pipelines.report.render import fmt_value, to_latex, to_markdown
from experiments.pipelines.report.runs import load_runs, run_label
from experiments.pipelines.report.significance import LEVEL, Records, row_statistics
from experiments.pipelines.report.wandb_runs import records_from_wandb

PAPER_REFERENCE = REPO_ROOT / "results" / "paper_reference.json"
BASELINE = "softmax"
# A row: one group of runs; its seeds are aggregated.
GROUP = ["table", "profile", "model", "dataset", "normalizer", "output_normalizer",
         "metric_name"]  # fmt: skip
COLUMNS = ("model", "dataset", "attention", "output", "metric", "mean ± std", "95% CI", "n",
           "seeds", "Δ vs softmax", "p vs softmax", "paper", "paper Δ")  # fmt: skip
CSV_COLUMNS = ["profile", "model", "dataset", "normalizer", "output_normalizer", "metric_name",
               "mean", "std", "ci_low", "ci_high", "n", "seeds", "delta_vs_softmax",
               "p_vs_softmax", "significant", "significance_test", "paper_value",
               "paper_delta_vs_softmax"]  # fmt: skip


# --- runs -> one line per (run, metric) -------------------------------------------------------


def table_spec(key: str, result: RunResult | None = None) -> registry.Table:
    """The table ``key`` as the registry declares it; for a table the registry does not know
    (an experiment since removed, or from another config dir), as the run stored it."""
    known = registry.tables()
    if key in known:
        return known[key]
    block = result.registry if result is not None else {}
    return registry.Table(
        key=key,
        sweep=str(block.get("sweep", key)),
        title=str(block.get("table_title", key)),
        order=int(block.get("table_order", 99)),
        metric=str(block.get("metric", "")),
        metric_label=str(block.get("metric_label", block.get("metric", ""))),
        higher_is_better=bool(block.get("higher_is_better", True)),
        also=tuple(block.get("also") or ()),
        experiments=(),
    )


def metric_label(name: str, metrics: Mapping[str, Any]) -> str:
    """The metric's name as a table shows it: an ε-perplexity names its ε, so that runs of
    different ε never share a row."""
    if "eps_perplexity" in name and metrics.get("eps_perplexity_epsilon") is not None:
        return f"{name} (ε={float(metrics['eps_perplexity_epsilon']):g})"
    return name


def table_lines(
    result: RunResult, where: str, spec: registry.Table | None = None
) -> list[dict[str, Any]]:
    """A run's lines for its table (``spec``, by default :func:`table_spec` of the run): its
    headline metric, and one per metric of the table's ``also`` that the run measured
    (finite). ``ValueError`` says why a run has none."""
    if result.table is None:
        raise ValueError("not in any table (its config has no registry block naming one)")
    if result.metric_value is None:
        raise ValueError(
            f"metric_value is null ({result.null_reasons.get('metric_value', 'no reason given')})"
        )
    required = ("task", "model", "normalizer", "output_normalizer", "metric_name")
    missing = [k for k in required if getattr(result, k) in (None, "")]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    try:
        value, seed = float(result.metric_value), int(result.seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metric_value/seed not numeric ({err})") from err
    if not math.isfinite(value):
        raise ValueError(f"metric_value is {value} (diverged or unfinished run)")
    spec = spec or table_spec(result.table, result)
    metrics = result.metrics or {}
    line = {
        "table": spec.key,
        "profile": str(result.profile or "paper"),
        "model": str(result.model),
        "dataset": str(result.dataset or ""),
        "normalizer": run_label(result, with_output=False),
        "output_normalizer": str(result.output_normalizer),
        "metric_name": metric_label(result.metric_name, metrics),
        "metric": result.metric_name,
        "seed": seed,
        "value": value,
        "path": where,
        "finished_at": str(result.finished_at or ""),
    }
    lines = [line]
    for name in spec.also:
        also, label = metrics.get(name), metric_label(name, metrics)
        if label != line["metric_name"] and isinstance(also, int | float) and math.isfinite(also):
            lines.append({**line, "metric_name": label, "metric": name, "value": float(also)})
    return lines


@dataclass
class Lines:
    """One line per run and metric, the tables they belong to, and the runs left out."""

    frame: pd.DataFrame
    specs: dict[str, registry.Table]
    problems: list[str]


def collect(results: Iterable[tuple[str, RunResult]], problems: Sequence[str] = ()) -> Lines:
    """The lines of each ``(where, record)``; one that has none is reported as
    "where: skipped, why"."""
    lines, specs, problems = [], {}, list(problems)
    for where, result in results:
        try:
            lines += table_lines(result, where, specs.get(result.table or ""))
            specs.setdefault(lines[-1]["table"], table_spec(lines[-1]["table"], result))
        except ValueError as err:
            problems.append(f"{where}: skipped, {err}")
    columns = [*GROUP, "metric", "seed", "value", "path", "finished_at"]
    return Lines(pd.DataFrame(lines, columns=columns), specs, problems)


def lines_from_paths(paths: Iterable[str | Path]) -> Lines:
    """:func:`collect` of every ``results.json`` under ``paths``."""
    runs, problems = load_runs(paths)
    return collect(((str(r.path), r.result) for r in runs), problems)


def lines_from_wandb(project: str) -> Lines:
    """:func:`collect` of the finished W&B runs of ``ENTITY/PROJECT``."""
    records, problems = records_from_wandb(project)
    results: list[tuple[str, RunResult]] = []
    for where, record in records:
        try:
            results.append((where, RunResult.from_dict(record)))
        except ValueError as err:
            problems.append(f"{where}: skipped, {err}")
    return collect(results, problems)


# --- lines -> rows ----------------------------------------------------------------------------


def _model_key(model: str) -> str:
    return model.lower().removeprefix("multimax_")


def load_paper_reference(path: str | Path = PAPER_REFERENCE) -> dict[str, dict]:
    """{table key: {(model, normaliser, output normaliser): value or None}}."""
    path = Path(path)
    if not path.exists():
        return {}
    tables = json.loads(path.read_text()).get("tables", {})
    return {
        key: {
            (_model_key(r["model"]), r["normalizer"], r["output_normalizer"]): r.get("value")
            for r in spec.get("rows", [])
        }
        for key, spec in tables.items()
    }


def newest_per_seed(lines: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The lines with one run per seed and group (the newest by ``finished_at``), and a note
    per older run."""
    lines = lines.sort_values(["finished_at", "path"], kind="stable")
    keys = [*GROUP, "seed"]
    older = lines.duplicated(keys, keep="last")
    kept = lines[~older]
    newest = kept.set_index(keys)["path"]
    notes = [
        f"{row.path}: superseded by {newest[tuple(row[k] for k in keys)]} (same seed)"
        for _, row in lines[older].iterrows()
    ]
    return kept, list(dict.fromkeys(notes))


def _is_baseline(frame: pd.DataFrame) -> pd.Series:
    return (frame["normalizer"] == BASELINE) & frame["output_normalizer"].isin([BASELINE, "none"])


def aggregate(
    lines: Lines, paper: Mapping[str, Mapping] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """One row per group: mean, sample std, n and seeds over the newest run of each seed;
    Δ to the softmax/softmax row of the same model (softmax/none for a model without an output
    distribution); for paper-profile rows of a table's headline metric the paper's value and
    its Δ. Rows in table order: model, dataset, metric, the softmax row first."""
    kept, notes = newest_per_seed(lines.frame)
    if kept.empty:
        columns = [*GROUP, "metric", "mean", "std", "n", "seeds", "baseline", "delta", "paper",
                   "paper_delta", "ci_low", "ci_high", "p_value", "test"]  # fmt: skip
        return pd.DataFrame(columns=columns), notes
    rows = (
        kept.groupby(GROUP, sort=False)
        .agg(
            metric=("metric", "first"),
            mean=("value", "mean"),
            std=("value", "std"),
            n=("value", "count"),
            seeds=("seed", lambda s: sorted(s)),
        )
        .reset_index()
    )
    rows["baseline"] = _is_baseline(rows)
    same_model = ["table", "profile", "model", "dataset", "metric_name"]
    base = rows[rows["baseline"]].drop_duplicates(same_model)[[*same_model, "mean"]]
    rows = rows.merge(base.rename(columns={"mean": "base_mean"}), on=same_model, how="left")
    rows["delta"] = rows["mean"] - rows["base_mean"]
    paper = paper or {}

    def paper_value(row: pd.Series, normalizer: str, output: str) -> float | None:
        if row["profile"] != "paper" or row["metric"] in lines.specs[row["table"]].also:
            return None
        return paper.get(row["table"], {}).get((_model_key(row["model"]), normalizer, output))

    rows["paper"] = [
        paper_value(r, r["normalizer"], r["output_normalizer"]) for _, r in rows.iterrows()
    ]
    base_paper = [paper_value(r, BASELINE, BASELINE) for _, r in rows.iterrows()]
    rows["paper_delta"] = [
        None if p is None or b is None else p - b
        for p, b in zip(rows["paper"], base_paper, strict=True)
    ]
    order = ["table", "profile", "model", "dataset", "metric_name", "not_baseline", "normalizer",
             "output_normalizer"]  # fmt: skip
    rows = rows.assign(not_baseline=~rows["baseline"]).sort_values(order, kind="stable")
    rows = rows.drop(columns=["not_baseline", "base_mean"]).reset_index(drop=True)
    return with_significance(rows, kept, notes), notes


def with_significance(rows: pd.DataFrame, kept: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
    """The rows with ``ci_low``/``ci_high`` (95 % interval) and, against the softmax row of the
    same model, ``p_value`` and ``test``, from the runs' per-example records
    (``significance``); None where the runs kept none. Problems are added to ``notes``."""
    records = Records()
    runs = {
        key: {
            int(line.seed): records.scored(line.path, line.metric, float(line.value))
            for line in group.itertuples()
        }
        for key, group in kept.groupby(GROUP, sort=False)
    }
    same_model = ["table", "profile", "model", "dataset", "metric_name"]
    baselines = {
        tuple(r[k] for k in same_model): runs[tuple(r[k] for k in GROUP)]
        for _, r in rows[rows["baseline"]].drop_duplicates(same_model).iterrows()
    }
    stats, problems = [], []
    for _, r in rows.iterrows():
        baseline = None if r["baseline"] else baselines.get(tuple(r[k] for k in same_model))
        where = f"{r['table']} {r['model']} {r['normalizer']}/{r['output_normalizer']}"
        stats.append(
            row_statistics(runs[tuple(r[k] for k in GROUP)], baseline, r["metric"], problems, where)
        )
    notes += list(dict.fromkeys(records.problems + problems))
    columns = ["ci_low", "ci_high", "p_value", "test"]
    return rows.assign(**{c: [s[c] for s in stats] for c in columns})


# --- rows -> files ----------------------------------------------------------------------------


def display(rows: pd.DataFrame, with_paper: bool) -> pd.DataFrame:
    """The rows as the Markdown and LaTeX tables show them (strings)."""
    cells = []
    for _, r in rows.iterrows():
        std = "" if pd.isna(r["std"]) else f" ± {fmt_value(r['std'], scale=r['mean'])}"
        line = [r["model"], r["dataset"], r["normalizer"], r["output_normalizer"],
                r["metric_name"], f"{fmt_value(r['mean'])}{std}", ci_cell(r), str(r["n"]),
                ",".join(map(str, r["seeds"])),
                "—" if r["baseline"] else fmt_value(r["delta"], signed=True, scale=r["mean"]),
                "—" if r["baseline"] else p_cell(r["p_value"])]  # fmt: skip
        if with_paper:
            paper_delta = fmt_value(r["paper_delta"], signed=True, scale=r["paper"])
            line += [fmt_value(r["paper"]), "—" if r["baseline"] else paper_delta]
        cells.append(line)
    columns = COLUMNS if with_paper else COLUMNS[:-2]
    return pd.DataFrame(cells, columns=list(columns), dtype=object)


def ci_cell(row: pd.Series) -> str:
    if row["ci_low"] is None or pd.isna(row["ci_low"]):
        return "n/a"
    low, high = (fmt_value(row[k], scale=row["mean"]) for k in ("ci_low", "ci_high"))
    return f"[{low}, {high}]"


def p_cell(p: float | None) -> str:
    """The p value, with ``*`` when it is below the level (significant)."""
    if p is None or pd.isna(p):
        return "n/a"
    return f"{p:.3f} *" if p < LEVEL else f"{p:.3f}"


def significance_note() -> str:
    """How the interval and the test were made: the tables' footnote."""
    return (
        "95% CI: two-stage bootstrap of the row's mean (seeds and test examples resampled "
        "with replacement, 1000 resamples, percentile interval; with one seed, the bootstrap "
        "over test examples alone). p vs softmax: paired test against the softmax row on the "
        "same test examples, per seed both rows ran, the largest p shown (BLEU: sacreBLEU's "
        "paired bootstrap, --paired-bs; perplexity and top-1: a paired bootstrap over test "
        f"examples); * marks p < {LEVEL:g}. n/a: the runs kept no per-example record. "
        "See docs/significance.md."
    )


def table_title(spec: registry.Table, profile: str, rows: pd.DataFrame) -> str:
    """The paper table's name; for another profile also the data the runs really used."""
    if profile == "paper":
        return f"{spec.title}: {spec.metric_label}"
    data = ", ".join(sorted({d for d in rows["dataset"] if d}))
    on = f" pipeline, {profile} runs on {data}" if data else f" pipeline, {profile} runs"
    metric = rows["metric_name"].iloc[0] if len(rows) else spec.metric_label
    return f"{spec.title}{on}: {metric} [{profile.upper()} RESULTS]"


def banner(profile: str) -> str:
    if profile == "paper":
        return (
            "Runs of the paper profile. 'paper' is the value printed in arXiv 2406.01189 "
            "(results/paper_reference.json; n/a where nobody has filled it in yet)."
        )
    if profile == "smoke":
        return (
            "SMOKE RESULTS: tiny models trained for minutes on small local data on a CPU. "
            "They show that the pipeline runs end to end; they are NOT comparable to the paper."
        )
    return f"Runs of profile '{profile}': not the paper recipe, NOT comparable to the paper."


def markdown_table(spec: registry.Table, profile: str, rows: pd.DataFrame) -> str:
    direction = "higher is better" if spec.higher_is_better else "lower is better"
    lines = [
        f"## {table_title(spec, profile, rows)}",
        "",
        f"> {banner(profile)}",
        "",
        f"Mean ± sample std over n seeds ({direction}); Δ: difference to the softmax/softmax "
        "row of the same model. Generated by scripts/make_tables.py from results.json files: "
        "do not edit.",
        "",
        significance_note(),
        "",
        to_markdown(display(rows, with_paper=profile == "paper")),
    ]
    return "\n".join(lines) + "\n"


def csv_table(profile: str, rows: pd.DataFrame) -> str:
    out = rows.assign(
        profile=profile,
        seeds=[" ".join(map(str, s)) for s in rows["seeds"]],
        delta_vs_softmax=rows["delta"],
        p_vs_softmax=rows["p_value"],
        significant=[None if p is None or pd.isna(p) else bool(p < LEVEL) for p in rows["p_value"]],
        significance_test=rows["test"],
        paper_value=rows["paper"],
        paper_delta_vs_softmax=rows["paper_delta"],
    )
    return out[CSV_COLUMNS].to_csv(index=False, lineterminator="\n")


def latex_table(spec: registry.Table, profile: str, rows: pd.DataFrame) -> str:
    header = [
        "% Generated by scripts/make_tables.py from results.json files: do not edit.",
        f"% {banner(profile)}",
        f"% {significance_note()}",
    ]
    body = to_latex(
        display(rows, with_paper=profile == "paper"), table_title(spec, profile, rows), 5
    )
    return "\n".join(header) + "\n" + body


def write_tables(
    rows: pd.DataFrame,
    specs: Mapping[str, registry.Table],
    out: str | Path,
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write ``<table>[_<profile>].{md,csv,tex}`` per table and an index ``tables.md``."""
    out = Path(out)
    written, sections = [], []
    groups = {key: part for key, part in rows.groupby(["table", "profile"], sort=False)}
    for key, profile in sorted(
        groups, key=lambda k: (k[1] != "paper", k[1], specs[k[0]].order, k[0])
    ):
        part, spec = groups[key, profile], specs[key]
        stem = key if profile == "paper" else f"{key}_{profile}"
        md = markdown_table(spec, profile, part)
        for suffix, text in ((".md", md), (".csv", csv_table(profile, part)),
                             (".tex", latex_table(spec, profile, part))):  # fmt: skip
            atomic_write_text(out / f"{stem}{suffix}", text)
            written.append(out / f"{stem}{suffix}")
        sections.append(md)
    index = ["# Results tables", "", "Generated by `scripts/make_tables.py`; do not edit.", ""]
    index += sections or ["No runs found.\n"]
    if notes:
        index += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    atomic_write_text(out / "tables.md", "\n".join(index))
    return [*written, out / "tables.md"]


def make_tables(
    run_dirs: Sequence[str | Path] = (),
    out: str | Path = "results",
    from_wandb: str | None = None,
    paper_reference: str | Path = PAPER_REFERENCE,
) -> tuple[list[Path], list[str]]:
    """Read runs, write tables; returns (files written, problem/notes lines printed)."""
    lines = lines_from_wandb(from_wandb) if from_wandb else lines_from_paths(run_dirs)
    rows, notes = aggregate(lines, load_paper_reference(paper_reference))
    problems = lines.problems
    written = write_tables(rows, lines.specs, out, problems + notes)
    for line in problems + notes:
        print(f"[make_tables] {line}", file=sys.stderr)
    runs = lines.frame.drop_duplicates("path").shape[0]
    tables = rows[["table", "profile"]].drop_duplicates().shape[0]
    print(f"[make_tables] {runs} runs -> {tables} tables, {len(rows)} rows in {out}")
    return written, problems + notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", help="run directories (searched recursively)")
    parser.add_argument("--out", default="results", help="output directory (default results/)")
    parser.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="read runs from W&B")
    parser.add_argument("--paper-reference", default=str(PAPER_REFERENCE))
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.from_wandb:
        parser.error("give run directories or --from-wandb ENTITY/PROJECT")
    try:
        make_tables(args.run_dirs, args.out, args.from_wandb, args.paper_reference)
    except FileNotFoundError as err:
        parser.error(str(err))
    return 0

"""Results tables from runs: every number comes from a run's ``results.json`` (or W&B).

    python scripts/make_tables.py RUNS_DIR... --out results/
    python scripts/make_tables.py --from-wandb ENTITY/PROJECT --out results/

Finds every ``results.json`` under the given directories (Hydra single-run and multirun
layouts alike), groups runs by paper table × profile × model × dataset × attention
normaliser × output normaliser, aggregates seeds (mean ± sample std, n) and writes per table
a Markdown, a CSV and a LaTeX file side by side with the paper's value from
``results/paper_reference.json`` (null → "n/a") and the difference to the softmax row of
the same model. Runs of a profile other than ``paper`` (e.g. ``smoke``) go to separate,
clearly labelled tables (``<table>_<profile>.*``). Broken or partial ``results.json`` files
are reported by path and skipped; a seed that appears twice in one group keeps the newest
run and reports the older one.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from experiments.core.io import REPO_ROOT

RESULTS_FILE = "results.json"  # the name experiments.core.results.write_results uses
PAPER_REFERENCE = REPO_ROOT / "results" / "paper_reference.json"
NORMALIZER_CONFIGS = REPO_ROOT / "configs" / "normalizer"
REQUIRED = (
    "task",
    "model",
    "normalizer",
    "output_normalizer",
    "seed",
    "metric_name",
    "metric_value",
)
BASELINE = "softmax"
# The headline metric of a task whose W&B summary does not name it (results.json always does).
DEFAULT_METRIC = {"image_classification": "top1", "mechanism": "task_error"}


@dataclass(frozen=True)
class TableSpec:
    """One paper table: which runs belong to it and how its metric reads."""

    key: str
    title: str
    metric: str
    keywords: tuple[str, ...]  # matched against "task dataset metric_name" of a run
    higher_is_better: bool = True
    # Further metrics of a run (from results.json "metrics") shown as rows of their own,
    # under their own names; the paper column belongs to the headline metric only.
    also: tuple[str, ...] = ()


TABLES: tuple[TableSpec, ...] = (
    TableSpec(
        "mechanism",
        "Mechanism study",
        "held-out task error",
        ("mechanism",),
        higher_is_better=False,
    ),
    TableSpec("wmt_bleu", "WMT En→De", "BLEU", ("wmt",), also=("compound_split_bleu",)),
    TableSpec("iwslt14_bleu", "IWSLT'14 De→En", "BLEU", ("iwslt", "translation")),
    TableSpec(
        "wikitext103_ppl",
        "WikiText-103",
        "test perplexity",
        ("wikitext", "language_model", "perplexity"),
        higher_is_better=False,
        # every run's ε-perplexity and share of zero-probability tokens: the comparable
        # numbers for outputs that give tokens probability 0 (sparsemax, entmax, evsoftmax)
        also=("test_eps_perplexity", "test_zero_prob_share"),
    ),
    TableSpec("imagenet_top1", "ImageNet-1K", "top-1 (%)", ("imagenet", "vision", "image")),
)


# The order of the tables in ``tables.md``: the paper's, then the mechanism study.
PAPER_ORDER = ("imagenet_top1", "wikitext103_ppl", "iwslt14_bleu", "wmt_bleu", "mechanism")


@dataclass
class Run:
    """The fields of one run that the tables use."""

    path: str
    task: str
    dataset: str
    model: str
    normalizer: str
    output_normalizer: str
    seed: int
    metric_name: str
    metric_value: float
    profile: str = "paper"
    finished_at: str = ""


@dataclass
class Row:
    """One table row: the seeds of one group, aggregated."""

    table: str
    profile: str
    model: str
    dataset: str
    normalizer: str
    output_normalizer: str
    metric_name: str
    runs: list[Run] = field(default_factory=list)
    delta: float | None = None
    paper: float | None = None
    paper_delta: float | None = None

    @property
    def values(self) -> list[float]:
        return [r.metric_value for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)


# --- reading runs -----------------------------------------------------------------------------


def find_results(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``results.json`` under ``paths`` (a file path is taken as is), sorted."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(q for q in p.rglob(RESULTS_FILE) if q.is_file())
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return sorted(found)


def normalizer_label(name: str, config: Mapping[str, Any] | None) -> str:
    """``name``, plus the options that differ from ``configs/normalizer/<name>.yaml``, so that
    e.g. MultiMax order 1 and 2 or a learned softmax temperature get rows of their own."""
    options = dict((config or {}).get("normalizer") or {})
    if options.get("name", name) != name or not options:
        return name
    defaults = _normalizer_defaults(name)
    changed = {
        k: v for k, v in options.items() if k != "name" and k in defaults and defaults[k] != v
    }
    changed.update({k: v for k, v in options.items() if k != "name" and k not in defaults})
    if not changed:
        return name
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"


def _normalizer_defaults(name: str) -> dict:
    path = NORMALIZER_CONFIGS / f"{name}.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(OmegaConf.load(path)))


def run_from_record(data: Mapping[str, Any], path: str) -> Run:
    """A :class:`Run` from a ``results.json`` mapping; ``ValueError`` says what is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError("not a JSON object")
    if data.get("metric_value") is None and "metric_value" in data:
        why = (data.get("null_reasons") or {}).get("metric_value", "no reason given")
        raise ValueError(f"metric_value is null ({why})")
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    try:
        value = float(data["metric_value"])
        seed = int(data["seed"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"metric_value/seed not numeric ({err})") from err
    if not math.isfinite(value):
        raise ValueError(f"metric_value is {value} (diverged or unfinished run)")
    config = data.get("config") or {}
    output = str(data["output_normalizer"])
    return Run(
        path=path,
        task=str(data["task"]),
        dataset=str(data.get("dataset") or ""),
        model=str(data["model"]),
        normalizer=normalizer_label(str(data["normalizer"]), config),
        output_normalizer=output,
        seed=seed,
        metric_name=metric_label(str(data["metric_name"]), data.get("metrics") or {}),
        metric_value=value,
        profile=str(data.get("profile") or "paper"),
        finished_at=str(data.get("finished_at") or ""),
    )


def metric_label(name: str, metrics: Mapping[str, Any]) -> str:
    """The metric's name as a table shows it: an ε-perplexity names its ε, so that runs of
    different ε never share a row."""
    if "eps_perplexity" in name and metrics.get("eps_perplexity_epsilon") is not None:
        return f"{name} (ε={float(metrics['eps_perplexity_epsilon']):g})"
    return name


def with_also_metrics(run: Run, metrics: Mapping[str, Any]) -> list[Run]:
    """``run`` and one copy per metric its table lists in ``also`` that ``metrics`` holds
    (finite), with that metric as the copy's ``metric_name`` / ``metric_value``."""
    out = [run]
    for name in table_of(run).also:
        value = metrics.get(name)
        label = metric_label(name, metrics)
        if label != run.metric_name and isinstance(value, int | float) and math.isfinite(value):
            out.append(replace(run, metric_name=label, metric_value=float(value)))
    return out


def load_runs(paths: Iterable[str | Path]) -> tuple[list[Run], list[str]]:
    """(good runs, one problem line per skipped file) from the ``results.json`` files."""
    runs, problems = [], []
    for path in find_results(paths):
        try:
            data = json.loads(path.read_text())
            run = run_from_record(data, str(path))
            runs += with_also_metrics(run, data.get("metrics") or {})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
            problems.append(f"{path}: skipped, {err}")
    return runs, problems


def runs_from_wandb(project: str) -> tuple[list[Run], list[str]]:
    """The same fields from the W&B runs of ``ENTITY/PROJECT`` (needs network and a login)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        raise SystemExit(
            f"--from-wandb needs the W&B API, but WANDB_MODE={mode}. Run online "
            "(unset WANDB_MODE, `wandb login`), after `wandb sync` of the offline runs; or "
            "pass the run directories instead: make_tables.py runs/ --out results/"
        )
    try:
        import wandb

        api_runs = list(wandb.Api(timeout=30).runs(project))
    except Exception as err:  # noqa: BLE001 - any API failure means: tell the user how to fix it
        raise SystemExit(
            f"--from-wandb {project}: could not read runs from the W&B API ({err}). Check the "
            "network, `wandb login` and the ENTITY/PROJECT path, or pass run directories."
        ) from err
    runs, problems = [], []
    for r in api_runs:
        where = f"wandb:{project}/{r.id}"
        if r.state != "finished":
            problems.append(f"{where}: skipped, state {r.state}")
            continue
        try:
            summary = dict(r.summary)
            run = run_from_record(record_from_wandb(r.config, summary), where)
            runs += with_also_metrics(run, summary)
        except ValueError as err:
            problems.append(f"{where}: skipped, {err}")
    return runs, problems


def record_from_wandb(config: Mapping[str, Any], summary: Mapping[str, Any]) -> dict:
    """A ``results.json``-shaped mapping from a W&B run's config (the resolved Hydra config)
    and summary: summary fields named as in ``results.json`` win; otherwise they come from
    the config and the summary's value of ``metric_name``."""
    model = config.get("model") or {}
    normalizer = config.get("normalizer") or {}
    profile = config.get("profile") or {}
    record = {
        "task": config.get("task"),
        "dataset": (config.get("data") or {}).get("name", ""),
        "model": model.get("name"),
        "normalizer": normalizer.get("name"),
        "output_normalizer": model.get("output_normalizer") or normalizer.get("name"),
        "seed": config.get("seed"),
        "profile": profile.get("name", "paper"),
        "config": dict(config),
    }
    record.update({k: v for k, v in summary.items() if k in (*REQUIRED, "dataset", "profile")})
    if not record.get("metric_name"):
        evaluate = config.get("evaluate") or {}
        record["metric_name"] = evaluate.get("metric") or DEFAULT_METRIC.get(record["task"])
    name = record.get("metric_name")
    if record.get("metric_value") is None and name:
        for key in (name, f"eval/{name}", f"val/{name}"):
            if key in summary:
                record["metric_value"] = summary[key]
                break
    return record


# --- grouping ---------------------------------------------------------------------------------


def table_of(run: Run) -> TableSpec:
    """The paper table a run belongs to (keywords of task, dataset and metric name); runs of
    another task get a table of their own, named after the task."""
    text = f"{run.task} {run.dataset} {run.metric_name}".lower()
    for spec in TABLES:
        if any(k in text for k in spec.keywords):
            return spec
    key = "".join(c if c.isalnum() else "_" for c in run.task.lower())
    return TableSpec(key, run.task, run.metric_name, ())


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


def build_rows(
    runs: Sequence[Run], paper: Mapping[str, Mapping] | None = None
) -> tuple[dict[tuple[str, str], list[Row]], list[str]]:
    """Rows per (table key, profile), seeds aggregated; and notes on superseded duplicates."""
    groups: dict[tuple, Row] = {}
    specs: dict[str, TableSpec] = {}
    for run in runs:
        spec = table_of(run)
        specs[spec.key] = spec
        key = (
            spec.key,
            run.profile,
            run.model,
            run.dataset,
            run.normalizer,
            run.output_normalizer,
            run.metric_name,
        )
        if key not in groups:
            groups[key] = Row(*key)
        groups[key].runs.append(run)

    notes = []
    for row in groups.values():
        newest: dict[int, Run] = {}
        for run in sorted(row.runs, key=lambda r: (r.finished_at, r.path)):
            if run.seed in newest:
                notes.append(f"{newest[run.seed].path}: superseded by {run.path} (same seed)")
            newest[run.seed] = run
        row.runs = sorted(newest.values(), key=lambda r: r.seed)

    tables: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in groups.values():
        tables[(row.table, row.profile)].append(row)
    paper = paper or {}
    for (table, profile), rows in tables.items():
        rows.sort(key=_row_order)
        for row in rows:
            base = _baseline(rows, row)
            row.delta = None if base is None else row.mean - base.mean
            if profile == "paper" and row.metric_name not in specs[table].also:
                ref = paper.get(table, {})
                row.paper = ref.get((_model_key(row.model), row.normalizer, row.output_normalizer))
                base_ref = ref.get((_model_key(row.model), BASELINE, BASELINE))
                if row.paper is not None and base_ref is not None:
                    row.paper_delta = row.paper - base_ref
    return dict(tables), notes


def _is_baseline(row: Row) -> bool:
    return row.normalizer == BASELINE and row.output_normalizer in (BASELINE, "none")


def _row_order(row: Row) -> tuple:
    return (row.model, row.dataset, row.metric_name, not _is_baseline(row), row.normalizer,
            row.output_normalizer)  # fmt: skip


def _baseline(rows: Sequence[Row], row: Row) -> Row | None:
    """The softmax/softmax row of the same model (softmax/none for a model without an
    output distribution)."""
    for other in rows:
        if (
            other.model == row.model
            and other.dataset == row.dataset
            and other.metric_name == row.metric_name
            and _is_baseline(other)
        ):
            return other
    return None


# --- writing ----------------------------------------------------------------------------------

COLUMNS = ("model", "dataset", "attention", "output", "metric", "mean ± std", "n", "seeds",
           "Δ vs softmax", "paper", "paper Δ")  # fmt: skip


def _fmt(value: float | None, signed: bool = False, scale: float | None = None) -> str:
    """Two decimals for values of 10 and above, three below; ``scale`` (the row's mean)
    sets the precision so that a row's numbers line up."""
    if value is None:
        return "n/a"
    digits = 2 if abs(value if scale is None else scale) >= 10 else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _cells(row: Row, with_paper: bool) -> list[str]:
    std = "" if row.std is None else f" ± {_fmt(row.std, scale=row.mean)}"
    is_base = _is_baseline(row)
    cells = [
        row.model,
        row.dataset,
        row.normalizer,
        row.output_normalizer,
        row.metric_name,
        f"{_fmt(row.mean)}{std}",
        str(row.n),
        ",".join(map(str, row.seeds)),
        "—" if is_base else _fmt(row.delta, signed=True, scale=row.mean),
    ]
    if with_paper:
        paper_delta = _fmt(row.paper_delta, signed=True, scale=row.paper)
        cells += [_fmt(row.paper), "—" if is_base else paper_delta]
    return cells


def table_title(spec: TableSpec, profile: str, rows: Sequence[Row] = ()) -> str:
    """The paper table's name; for another profile also the data the runs really used."""
    title = f"{spec.title}: {spec.metric}"
    if profile == "paper":
        return title
    data = ", ".join(sorted({r.dataset for r in rows if r.dataset}))
    on = f" pipeline, {profile} runs on {data}" if data else f" pipeline, {profile} runs"
    return f"{spec.title}{on}: {rows[0].metric_name if rows else spec.metric} [{profile.upper()} RESULTS]"


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


def to_markdown(spec: TableSpec, profile: str, rows: Sequence[Row]) -> str:
    with_paper = profile == "paper"
    cols = COLUMNS if with_paper else COLUMNS[:-2]
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
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r, with_paper)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(profile: str, rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["profile", "model", "dataset", "normalizer", "output_normalizer",
                     "metric_name", "mean", "std", "n", "seeds", "delta_vs_softmax",
                     "paper_value", "paper_delta_vs_softmax"])  # fmt: skip
    for r in rows:
        writer.writerow([profile, r.model, r.dataset, r.normalizer, r.output_normalizer,
                         r.metric_name, repr(r.mean), "" if r.std is None else repr(r.std),
                         r.n, " ".join(map(str, r.seeds)),
                         "" if r.delta is None else repr(r.delta),
                         "" if r.paper is None else r.paper,
                         "" if r.paper_delta is None else repr(r.paper_delta)])  # fmt: skip
    return buf.getvalue()


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("→", r"$\to$"),
                 ("—", "--")):  # fmt: skip
        text = text.replace(a, b)
    return text


def to_latex(spec: TableSpec, profile: str, rows: Sequence[Row]) -> str:
    with_paper = profile == "paper"
    cols = COLUMNS if with_paper else COLUMNS[:-2]
    lines = [
        "% Generated by scripts/make_tables.py from results.json files: do not edit.",
        f"% {banner(profile)}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_tex(table_title(spec, profile, rows))}}}",
        r"\begin{tabular}{" + "l" * 5 + "r" * (len(cols) - 5) + "}",
        r"\toprule",
        " & ".join(_tex(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_tex(c) for c in _cells(r, with_paper)) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(
    tables: Mapping[tuple[str, str], list[Row]], out: str | Path, notes: Sequence[str] = ()
) -> list[Path]:
    """Write ``<table>[_<profile>].{md,csv,tex}`` per table and an index ``tables.md``."""
    from experiments.core.io import atomic_write_text

    out = Path(out)
    written, sections = [], []
    specs = {s.key: s for s in TABLES}
    order = {k: i for i, k in enumerate(PAPER_ORDER)}
    for (key, profile), rows in sorted(
        tables.items(),
        key=lambda kv: (kv[0][1] != "paper", kv[0][1], order.get(kv[0][0], 99), kv[0]),
    ):
        spec = specs.get(key) or TableSpec(key, key, rows[0].metric_name, ())
        stem = key if profile == "paper" else f"{key}_{profile}"
        md = to_markdown(spec, profile, rows)
        for suffix, text in ((".md", md), (".csv", to_csv(profile, rows)),
                             (".tex", to_latex(spec, profile, rows))):  # fmt: skip
            path = out / f"{stem}{suffix}"
            atomic_write_text(path, text)
            written.append(path)
        sections.append(md)
    index = ["# Results tables", "", "Generated by `scripts/make_tables.py`; do not edit.", ""]
    index += sections or ["No runs found.\n"]
    if notes:
        index += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out / "tables.md"
    atomic_write_text(path, "\n".join(index))
    written.append(path)
    return written


def make_tables(
    run_dirs: Sequence[str | Path] = (),
    out: str | Path = "results",
    from_wandb: str | None = None,
    paper_reference: str | Path = PAPER_REFERENCE,
) -> tuple[list[Path], list[str]]:
    """Read runs, write tables; returns (files written, problem/notes lines printed)."""
    runs, problems = runs_from_wandb(from_wandb) if from_wandb else load_runs(run_dirs)
    tables, notes = build_rows(runs, load_paper_reference(paper_reference))
    written = write_tables(tables, out, problems + notes)
    for line in problems + notes:
        print(f"[make_tables] {line}", file=sys.stderr)
    rows = sum(len(r) for r in tables.values())
    print(f"[make_tables] {len(runs)} runs -> {len(tables)} tables, {rows} rows in {out}")
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

"""The experiment registry: which experiments, apps and tables exist, read from the one place
that says it, the ``registry:`` block of each ``configs/experiment/<name>.yaml``.

Adding an experiment is adding one YAML file there; sweeps (``scripts/sweep.sh``), the
tables, ``make demo``, the config check and the GPU check all read this module and never
list experiments themselves::

    registry:
      app: translation              # the Hydra app that runs it: python -m experiments.<app>
      table: iwslt14_bleu           # its results table (results/<table>.*)
      sweep: iwslt14                # scripts/sweep.sh iwslt14 runs the table's grid
      table_title: "IWSLT'14 De→En"
      table_order: 3                # the table's place in results/tables.md
      metric: sacrebleu             # results.json metric_name of the table's number
      metric_label: "BLEU"
      higher_is_better: true
      also: []                      # further results.json metrics, shown as rows of their own
      demo: {key: mt, title: translation}   # make demo runs its smoke profile (null: not)

    python -m experiments.core.registry sweep NAME    # "APP EXPERIMENT[,EXPERIMENT...]" for sweep.sh
    python -m experiments.core.registry sweeps        # the sweep names, in table order
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

from experiments.core.errors import ConfigError
from experiments.core.io import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "configs"
FIELDS = (
    "app",
    "table",
    "sweep",
    "table_title",
    "table_order",
    "metric",
    "metric_label",
    "higher_is_better",
    "also",
    "demo",
)


@dataclass(frozen=True)
class Table:
    """One results table: the runs of every experiment that names it."""

    key: str
    sweep: str
    title: str
    order: int
    metric: str
    metric_label: str
    higher_is_better: bool
    also: tuple[str, ...]
    experiments: tuple[str, ...]


@dataclass(frozen=True)
class Experiment:
    """One ``configs/experiment/<name>.yaml`` and what its ``registry:`` block declares."""

    name: str
    app: str
    table: str
    sweep: str
    table_title: str
    table_order: int
    metric: str
    metric_label: str
    higher_is_better: bool
    also: tuple[str, ...] = ()
    demo_key: str | None = None
    demo_title: str | None = None

    @property
    def module(self) -> str:
        """The app's module: ``python -m <module> experiment=<name>``."""
        return f"experiments.{self.app}"


def _read(path: Path) -> Experiment:
    block = OmegaConf.to_container(OmegaConf.load(path)).get("registry")
    if not isinstance(block, dict):
        raise ConfigError(f"{path}: no 'registry:' block; add one naming {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in block]
    unknown = sorted(set(block) - set(FIELDS))
    if missing or unknown:
        raise ConfigError(
            f"{path}: registry block "
            + (f"lacks {', '.join(missing)}" if missing else f"has unknown {', '.join(unknown)}")
            + f"; its fields are {', '.join(FIELDS)}"
        )
    demo = block["demo"] or {}
    return Experiment(
        name=path.stem,
        app=str(block["app"]),
        table=str(block["table"]),
        sweep=str(block["sweep"]),
        table_title=str(block["table_title"]),
        table_order=int(block["table_order"]),
        metric=str(block["metric"]),
        metric_label=str(block["metric_label"]),
        higher_is_better=bool(block["higher_is_better"]),
        also=tuple(block["also"] or ()),
        demo_key=demo.get("key"),
        demo_title=demo.get("title"),
    )


@cache
def experiments(config_dir: Path = CONFIG_DIR) -> dict[str, Experiment]:
    """Every experiment, by name, in file-name order."""
    found = sorted(Path(config_dir, "experiment").glob("*.yaml"))
    return {e.name: e for e in map(_read, found)}


def experiment(name: str, config_dir: Path = CONFIG_DIR) -> Experiment:
    """One experiment; a :class:`ConfigError` naming the choices when there is none."""
    known = experiments(config_dir)
    if name not in known:
        raise ConfigError(
            f"unknown experiment '{name}'; choose one of {', '.join(known)} "
            "(or add configs/experiment/<name>.yaml with a registry: block)"
        )
    return known[name]


def experiments_of(app: str, config_dir: Path = CONFIG_DIR) -> tuple[str, ...]:
    """The experiments an app runs."""
    return tuple(e.name for e in experiments(config_dir).values() if e.app == app)


def _table_fields(e: Experiment) -> tuple:
    return (
        e.sweep,
        e.table_title,
        e.table_order,
        e.metric,
        e.metric_label,
        e.higher_is_better,
        e.also,
    )


def tables(config_dir: Path = CONFIG_DIR) -> dict[str, Table]:
    """Every table, in ``table_order``; experiments sharing a table must agree on it."""
    by_key: dict[str, list[Experiment]] = {}
    for e in experiments(config_dir).values():
        by_key.setdefault(e.table, []).append(e)
    out = {}
    for key, members in by_key.items():
        first = members[0]
        for other in members[1:]:
            if _table_fields(other) != _table_fields(first):
                raise ConfigError(
                    f"experiments {first.name} and {other.name} share table '{key}' but declare "
                    "it differently; give them the same table_* / metric* / also values"
                )
        out[key] = Table(
            key=key,
            sweep=first.sweep,
            title=first.table_title,
            order=first.table_order,
            metric=first.metric,
            metric_label=first.metric_label,
            higher_is_better=first.higher_is_better,
            also=first.also,
            experiments=tuple(e.name for e in members),
        )
    return dict(sorted(out.items(), key=lambda kv: (kv[1].order, kv[0])))


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "sweep":
        by_sweep = {t.sweep: t for t in tables().values()}
        table = by_sweep.get(argv[1])
        if table is None:
            print(f"unknown table '{argv[1]}'; choose {', '.join(by_sweep)}", file=sys.stderr)
            return 2
        apps = {experiments()[name].app for name in table.experiments}
        if len(apps) != 1:
            print(f"table '{argv[1]}' spans apps {sorted(apps)}", file=sys.stderr)
            return 2
        print(apps.pop(), ",".join(table.experiments))
        return 0
    if argv == ["sweeps"]:
        print(" ".join(t.sweep for t in tables().values()))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

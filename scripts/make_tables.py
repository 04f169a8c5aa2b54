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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.report.tables import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

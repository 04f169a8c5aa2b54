"""Results tables (Markdown, CSV, LaTeX) from runs' results.json files or W&B
(``experiments.pipelines.report.tables``).

    python scripts/make_tables.py RUNS_DIR... --out results/
    python scripts/make_tables.py --from-wandb ENTITY/PROJECT --out results/
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.report.tables import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

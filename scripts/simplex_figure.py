"""The simplex picture: every normaliser applied to one path of 3-element scores
(``experiments.pipelines.report.simplex``).

    python -m scripts.simplex_figure --out results/figures
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.report.simplex import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())

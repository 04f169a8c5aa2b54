"""Figures from run directories: training curves, attention statistics, learned σ and
attention maps (``experiments.pipelines.report.figures``).

    python -m experiments.analyze RUNS_DIR... --out results/figures
"""

import sys

from experiments.pipelines.report.figures import main

if __name__ == "__main__":
    sys.exit(main())

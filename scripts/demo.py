"""``make demo``: every pipeline's smoke runs, their tables and figures, on a CPU in minutes
(``experiments.pipelines.demo``).

    python -m scripts.demo [--normalizers softmax,multimax] [--pipelines vision,lm,mt,mechanism]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

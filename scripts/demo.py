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

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

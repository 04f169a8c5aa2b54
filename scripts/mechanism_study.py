"""The mechanism study: run its Hydra multirun grid, then regenerate results/mechanism/.

    .venv/bin/python -m scripts.mechanism_study                      # the default grid
    .venv/bin/python -m scripts.mechanism_study profile=smoke        # any Hydra override
    .venv/bin/python -m scripts.mechanism_study --report-only runs/mechanism/study/<time>

The grid (normalisers × training N × m × seeds) is ``study`` in
configs/experiment/mechanism_retrieval.yaml: one multirun of ``experiments.mechanism`` per
normaliser entry (``normalizer.order`` exists only for multimax, so the entries cannot be one
sweep axis). Tables and figures are made from the runs' results.json / inspect.json only.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.mechanism.study import main  # noqa: E402

if __name__ == "__main__":
    main()

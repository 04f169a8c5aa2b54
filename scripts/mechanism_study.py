"""The mechanism study: its Hydra multirun grid, then results/mechanism/ regenerated
(``experiments.pipelines.mechanism.study``).

    .venv/bin/python -m scripts.mechanism_study                      # the default grid
    .venv/bin/python -m scripts.mechanism_study profile=smoke        # any Hydra override
    .venv/bin/python -m scripts.mechanism_study --report-only runs/mechanism/study/<time>
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.pipelines.mechanism.study import main  # noqa: E402

if __name__ == "__main__":
    main()

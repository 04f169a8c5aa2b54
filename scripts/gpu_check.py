"""The GPU check, for the day a CUDA device is lent: ``pytest -m cuda``, a dry run of every
registered experiment and the benchmark, each in its own process with a time limit, one
verdict per item (``experiments/pipelines/gpu_check.py`` says what runs).

    python -m scripts.gpu_check [--budget-s 450] [--only paths,recompiles,...]
"""

import sys

from experiments.pipelines.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())

"""Build the ImageNet-1K image-folder tree that ``experiments.vision`` reads.

    python scripts/prepare_imagenet.py --help     # archives | hf | check

The work is done by ``experiments/pipelines/vision/imagenet.py`` (its docstring has the layouts).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
    from experiments.pipelines.vision.imagenet import main

    raise SystemExit(main())

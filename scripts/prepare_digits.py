"""Write scikit-learn's 1,797 real 8×8 handwritten digits as an image-folder tree.

    python scripts/prepare_digits.py [--root data/digits]

The work is done by ``experiments/pipelines/vision/digits.py`` (the vision app calls it too).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
    from experiments.pipelines.vision.digits import main

    main()

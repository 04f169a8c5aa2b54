"""Write scikit-learn's 1,797 real 8×8 handwritten digits as an image-folder tree.

    python scripts/prepare_digits.py [--root data/digits]

Layout (the ImageNet layout, so the smoke profile goes through the same loader)::

    ROOT/train/<digit>/<index>.png    1,437 images (stratified 80 %)
    ROOT/val/<digit>/<index>.png        360 images

Pixels 0..16 become 8-bit grey levels (×255/16, rounded). The tree is built in a temporary
folder and renamed into place, so a reader never sees half of it; an existing complete tree
is left alone. The vision app calls :func:`write_digits` itself when the tree is missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

COMPLETE_MARKER = ".complete"
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def digits_tree_complete(root: str | Path) -> bool:
    return (Path(root) / COMPLETE_MARKER).exists()


def write_digits(root: str | Path = "data/digits") -> Path:
    """Build the digits tree at ``root`` unless it is already there; returns ``root``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if digits_tree_complete(root):
        return root
    if root.is_dir() and any(root.iterdir()):  # someone else's files: never replaced
        found = ", ".join(sorted(p.name for p in root.iterdir())[:5])
        raise FileExistsError(
            f"{root} holds files but no finished digits tree (no {COMPLETE_MARKER} marker; "
            f"found: {found}); give a missing or empty folder, where the digits are written"
        )
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(
        index, test_size=VAL_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=root.parent))
    try:
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for i in sorted(ids):
                folder = tmp / split / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")
        (tmp / COMPLETE_MARKER).write_text(f"{len(train_idx)} train, {len(val_idx)} val\n")
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # an empty folder given as the root: the rename needs it gone
        try:
            os.replace(tmp, root)  # atomic; fails if another process got there first
        except OSError:
            if not digits_tree_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data/digits", help="where the tree goes")
    args = parser.parse_args(argv)
    try:
        root = write_digits(args.root)
    except FileExistsError as err:
        raise SystemExit(f"ERROR: {err}") from None
    print(
        f"digits image-folder tree ready at {root} ({(root / COMPLETE_MARKER).read_text().strip()})"
    )

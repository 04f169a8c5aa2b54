"""Build the ImageNet-1K image-folder tree that ``experiments.vision`` reads.

    ROOT/train/<wnid>/<image>.JPEG   1,281,167 images in 1,000 class folders
    ROOT/val/<wnid>/<image>.JPEG        50,000 images in the same 1,000 class folders

From the official archives (image-net.org, ILSVRC2012)::

    python scripts/prepare_imagenet.py archives --train-tar ILSVRC2012_img_train.tar \\
        --val-tar ILSVRC2012_img_val.tar --devkit ILSVRC2012_devkit_t12.tar.gz --root data/imagenet

From a Hugging Face ``datasets`` copy you already have (``imagenet-1k`` in the local cache,
or a folder written by ``save_to_disk``); class folders are then named by the label index
(``0000`` ... ``0999``, which sorts like the wnids, so label i stays class i)::

    python scripts/prepare_imagenet.py hf --dataset imagenet-1k --root data/imagenet
    python scripts/prepare_imagenet.py hf --from-disk /path/to/saved --root data/imagenet

Check an existing tree::

    python scripts/prepare_imagenet.py check --root data/imagenet

Every file is written under a temporary name and renamed, and finished classes are skipped,
so an interrupted run can be restarted with the same command.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path

NUM_CLASSES = 1000
SPLIT_SIZES = {"train": 1_281_167, "val": 50_000}


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _progress(done: int, total: int, what: str) -> None:
    if done % 10_000 == 0 or done == total:
        print(f"{what}: {done:,}/{total:,}", flush=True)


def extract_train(train_tar: Path, root: Path) -> None:
    """The train archive holds one tar per class (<wnid>.tar) of JPEGs."""
    done = 0
    with tarfile.open(train_tar) as outer:
        for member in outer:
            wnid = Path(member.name).stem
            target = root / "train" / wnid
            marker = target / ".complete"
            inner_file = outer.extractfile(member)
            if marker.exists() or inner_file is None:
                continue
            with tarfile.open(fileobj=io.BytesIO(inner_file.read())) as inner:
                for image in inner:
                    data = inner.extractfile(image)
                    if data is not None:
                        _write_bytes(target / Path(image.name).name, data.read())
                        done += 1
                        _progress(done, SPLIT_SIZES["train"], "train")
            marker.write_text("")


def val_labels(devkit: Path) -> list[str]:
    """wnid of each validation image (ILSVRC2012_val_00000001 ... in order), from the devkit."""
    from scipy.io import loadmat

    with tarfile.open(devkit) as tar:
        names = tar.getnames()
        meta_name = next(n for n in names if n.endswith("data/meta.mat"))
        truth_name = next(n for n in names if n.endswith("ILSVRC2012_validation_ground_truth.txt"))
        meta = loadmat(io.BytesIO(tar.extractfile(meta_name).read()), squeeze_me=True)["synsets"]
        truth = tar.extractfile(truth_name).read().decode().split()
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta}
    return [id_to_wnid[int(i)] for i in truth]


def extract_val(val_tar: Path, devkit: Path, root: Path) -> None:
    labels = val_labels(devkit)
    with tarfile.open(val_tar) as tar:
        for done, member in enumerate(tar, start=1):
            data = tar.extractfile(member)
            if data is None:
                continue
            index = int(Path(member.name).stem.rsplit("_", 1)[1]) - 1
            path = root / "val" / labels[index] / Path(member.name).name
            if not path.exists():
                _write_bytes(path, data.read())
            _progress(done, SPLIT_SIZES["val"], "val")


def from_hf(root: Path, dataset: str | None, from_disk: str | None) -> None:
    """Write a ``datasets`` copy (columns ``image``, ``label``) as class folders."""
    import datasets

    splits = datasets.load_from_disk(from_disk) if from_disk else datasets.load_dataset(dataset)
    for split, folder in (("train", "train"), ("validation", "val")):
        ds = splits[split]
        for i, row in enumerate(ds):
            path = root / folder / f"{int(row['label']):04d}" / f"{split}_{i:08d}.JPEG"
            if not path.exists():
                buffer = io.BytesIO()
                row["image"].convert("RGB").save(buffer, format="JPEG", quality=95)
                _write_bytes(path, buffer.getvalue())
            _progress(i + 1, len(ds), folder)


def check(root: Path) -> int:
    """Print the layout found; 0 when both splits have the same 1,000 class folders."""
    problems = []
    classes = {}
    for split in ("train", "val"):
        folder = root / split
        classes[split] = (
            sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        )
        count = sum(1 for c in classes[split] for _ in (folder / c).iterdir())
        print(
            f"{folder}: {len(classes[split])} classes, {count:,} files (expected {SPLIT_SIZES[split]:,})"
        )
        if len(classes[split]) != NUM_CLASSES:
            problems.append(
                f"{folder} has {len(classes[split])} class folders, expected {NUM_CLASSES}"
            )
    if classes["train"] != classes["val"]:
        problems.append("train and val class folders differ")
    for p in problems:
        print("problem:", p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)
    a = sub.add_parser("archives", help="from the official ILSVRC2012 tar files")
    a.add_argument("--train-tar", type=Path, required=True)
    a.add_argument("--val-tar", type=Path, required=True)
    a.add_argument("--devkit", type=Path, required=True)
    h = sub.add_parser("hf", help="from a Hugging Face datasets copy you already have")
    h.add_argument("--dataset", default="imagenet-1k")
    h.add_argument("--from-disk", default=None)
    sub.add_parser("check", help="check an existing tree")
    for p in (a, h, sub.choices["check"]):
        p.add_argument("--root", type=Path, default=Path("data/imagenet"))
    args = parser.parse_args(argv)
    if args.source == "archives":
        extract_train(args.train_tar, args.root)
        extract_val(args.val_tar, args.devkit, args.root)
    elif args.source == "hf":
        from_hf(args.root, args.dataset, args.from_disk)
    return check(args.root)

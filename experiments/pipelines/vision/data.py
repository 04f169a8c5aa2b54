"""The vision data pipeline from timm's parts: image-folder datasets, the DeiT transforms
(``create_transform``: RandAugment, random erasing), Mixup / CutMix, the repeated-
augmentation sampler, and a resumable wrapper around the samplers.

ImageNet and the smoke digits go through the same code; only the config differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data import ImageDataset, Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from experiments.core.errors import ConfigError, RunStop
from experiments.core.io import REPO_ROOT, atomic_write_text
from experiments.core.setup import DistributedContext
from experiments.pipelines.vision.digits import write_digits

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
IMAGE_CHECK_FILE = ".image_check.json"
# Bytes at the end of a file that must hold the format's end marker (JPEG files may carry a
# little padding after theirs).
_TRAILER_BYTES = 1024


class DataLayoutError(RunStop, FileNotFoundError):
    """The data root is missing or not an image-folder tree."""


class BadImagesError(RunStop):
    """Images of the tree cannot be read; the message names them and the fix."""


def data_root(cfg: DictConfig) -> Path:
    root = Path(str(cfg.data.root)).expanduser()
    return root if root.is_absolute() else REPO_ROOT / root


def check_image_folder(root: Path, splits: tuple[str, ...], prepare_command: str) -> None:
    """Raise :class:`DataLayoutError` naming the expected layout unless every split of
    ``root`` is a folder of class folders holding images."""
    layout = (
        f"expected {root}/<split>/<class>/<image> for splits {', '.join(splits)} "
        f"(e.g. {root}/train/n01440764/xxx.JPEG); build it with: {prepare_command} "
        "(or point data.root=... at an existing tree)"
    )
    for split in splits:
        folder = root / split
        if not folder.is_dir():
            raise DataLayoutError(f"data split {folder} not found; {layout}")
        classes = [c for c in folder.iterdir() if c.is_dir()]
        if not classes:
            raise DataLayoutError(f"{folder} has no class folders; {layout}")
        first = next((f for c in sorted(classes)[:5] for f in sorted(c.iterdir())), None)
        if first is None or first.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataLayoutError(f"{folder}'s class folders hold no images; {layout}")


def image_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be trained on, or None: its header must parse, a PNG
    must pass its checksums and a JPEG must end with its end-of-image marker (a file cut
    short fails here instead of being swapped for another sample at every epoch)."""
    try:
        with Image.open(path) as img:
            kind = img.format
            img.verify()  # PNG: every chunk's CRC; other formats: the header
        if kind in ("JPEG", "PNG"):
            with path.open("rb") as f:
                f.seek(max(path.stat().st_size - _TRAILER_BYTES, 0))
                tail = f.read()
            marker = b"\xff\xd9" if kind == "JPEG" else b"IEND"
            if marker not in tail:
                return f"{kind} file cut short (no end marker)"
    except Exception as err:  # noqa: BLE001 - any failure to read means: not usable
        why = (str(err).splitlines() or [type(err).__name__])[0]
        return why.replace(f" '{path}'", "").replace(str(path), "")[:120]
    return None


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for c in folder.iterdir() if c.is_dir() for p in c.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES
    )  # fmt: skip


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha1()
    for p in files:
        st = p.stat()
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _check_cache(root: Path) -> Path:
    """Where the image check of ``root`` is remembered: in the tree, or the user's cache
    when the tree is read-only."""
    if os.access(root, os.W_OK):
        return root / IMAGE_CHECK_FILE
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "multimax"
    return cache / f"image_check_{hashlib.sha1(str(root).encode()).hexdigest()[:16]}.json"


def unreadable_images(root: Path, split: str, workers: int = 16) -> dict[str, str]:
    """{path: why} of the images of ``root/split`` that cannot be read (:func:`image_problem`);
    checked once, then remembered until a file of the split changes."""
    folder = root / split
    files = _image_files(folder)
    fingerprint = _fingerprint(files)
    cache = _check_cache(root)
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(split) or {}
    if entry.get("fingerprint") == fingerprint:
        return dict(entry.get("unreadable", {}))
    if len(files) > 20_000:
        print(f"[data] checking the {len(files):,} images of {folder} once", flush=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # I/O bound: threads suffice
        found = dict(zip(map(str, files), pool.map(image_problem, files)))
    bad = {path: why for path, why in found.items() if why is not None}
    known[split] = {"fingerprint": fingerprint, "files": len(files), "unreadable": bad}
    with contextlib.suppress(OSError):  # no cache: the check runs again next time
        atomic_write_text(cache, json.dumps(known, indent=1) + "\n")
    return bad


def check_images(cfg: DictConfig, root: Path) -> dict[str, set[str]]:
    """{split: unreadable files to leave out}; with ``data.bad_images=refuse`` (the default)
    any unreadable file stops the run, naming the files and the fix."""
    policy = str(cfg.data.get("bad_images", "refuse"))
    splits = [str(cfg.data.train_split), str(cfg.data.val_split)]
    found = {split: bad for split in splits if (bad := unreadable_images(root, split))}
    for split, bad in found.items():
        shown = "; ".join(f"{p} ({why})" for p, why in sorted(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        if policy != "skip":
            raise BadImagesError(
                f"{len(bad)} image(s) of {root / split} cannot be read: {shown}{more}. "
                f"Replace or delete them (the full list is in {_check_cache(root)}), or set "
                "data.bad_images=skip to leave them out"
            )
        print(f"[data] leaving out {len(bad)} unreadable image(s) of {root / split} "
              f"(data.bad_images=skip): {shown}{more}", flush=True)  # fmt: skip
    return {split: set(bad) for split, bad in found.items()}


def ensure_data(cfg: DictConfig) -> Path:
    """The checked data root; the digits tree is written on first use (cached, atomically)."""
    root = data_root(cfg)
    if cfg.data.name == "digits":
        try:
            write_digits(root)
        except FileExistsError as err:
            raise DataLayoutError(f"data.root={root}: {err}") from None
    check_image_folder(root, (cfg.data.train_split, cfg.data.val_split), cfg.data.prepare_command)
    return root


class ImageFolder(ImageDataset):
    """timm's ``ImageDataset`` without its silent substitution: a file that cannot be read
    stops the run naming it (timm would train on the next sample instead)."""

    def __init__(self, root: str, leave_out: set[str] = frozenset(), **kwargs) -> None:
        super().__init__(root, **kwargs)
        self._max_retries = 1
        if leave_out:
            samples = self.reader.samples
            self.reader.samples = [s for s in samples if str(s[0]) not in leave_out]

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except RuntimeError as err:
            path = self.reader.samples[index][0]
            raise BadImagesError(
                f"{path} cannot be read; replace or delete it, or set data.bad_images=skip"
            ) from err


class RandomImages(Dataset):
    """Random RGB images of a real size with random labels: dry runs without the data."""

    def __init__(self, length: int, num_classes: int, size=(375, 500), transform=None) -> None:
        self.length, self.num_classes, self.size, self.transform = (
            length,
            num_classes,
            size,
            transform,
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        rng = np.random.default_rng(index)
        img = Image.fromarray(rng.integers(0, 256, (*self.size, 3), dtype=np.uint8))
        target = int(rng.integers(self.num_classes))
        return (self.transform(img) if self.transform else img), target


def build_transforms(cfg: DictConfig):
    """(train, eval) transforms: timm's create_transform with the DeiT augmentation."""
    d, a = cfg.data, cfg.augment
    common = {
        "input_size": (int(d.in_chans), int(d.img_size), int(d.img_size)),
        "interpolation": d.interpolation,
        "mean": tuple(d.mean),
        "std": tuple(d.std),
    }
    train = create_transform(
        is_training=True,
        no_aug=bool(a.get("no_aug", False)),
        scale=tuple(a.scale),
        ratio=tuple(a.ratio),
        hflip=float(a.hflip),
        color_jitter=float(a.color_jitter),
        auto_augment=a.auto_augment,
        re_prob=float(a.reprob),
        re_mode=a.remode,
        re_count=int(a.recount),
        **common,
    )
    evaluation = create_transform(is_training=False, crop_pct=float(d.crop_pct), **common)
    return train, evaluation


def build_datasets(cfg: DictConfig, synthetic: bool = False) -> tuple[Dataset, Dataset]:
    """(train, val) datasets; ``synthetic`` gives random images of the configured sizes."""
    train_tf, eval_tf = build_transforms(cfg)
    if synthetic:
        n = int(cfg.data.num_classes)
        return (
            RandomImages(int(cfg.data.train_size), n, transform=train_tf),
            RandomImages(int(cfg.data.val_size), n, transform=eval_tf),
        )
    root = ensure_data(cfg)
    leave_out = check_images(cfg, root)
    train_split, val_split = str(cfg.data.train_split), str(cfg.data.val_split)
    train = ImageFolder(
        str(root / train_split), leave_out=leave_out.get(train_split, set()), transform=train_tf
    )
    val = ImageFolder(
        str(root / val_split),
        leave_out=leave_out.get(val_split, set()),
        transform=eval_tf,
        class_map=_class_map(train),
    )
    return train, val


def _class_map(dataset: ImageDataset) -> dict[str, int]:
    return dict(dataset.reader.class_to_idx)


class ResumableSampler(Sampler[int]):
    """Wraps an epoch-seeded sampler; ``start(epoch, skip)`` makes the next pass begin
    ``skip`` samples into that epoch's order (a resumed run continues mid-epoch)."""

    def __init__(self, base: Sampler[int]) -> None:
        self.base = base
        self.epoch = 0
        self.skip = 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        it = iter(self.base)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return len(self.base)


class ShardSampler(Sampler[int]):
    """Every ``world``-th index from ``rank``: an exact, unpadded evaluation split."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class VisionData:
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: ResumableSampler
    mixup: Mixup | None
    batch_per_process: int
    steps_per_epoch: int
    train_size: int
    synthetic: bool


def per_process_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(
            f"trainer.batch_size={global_batch} (global) does not split over {world_size} "
            "processes; pick a multiple of the process count"
        )
    return global_batch // world_size


def build_data(
    cfg: DictConfig,
    ctx: DistributedContext,
    synthetic: bool = False,
    batch_per_process: int | None = None,
    num_workers: int | None = None,
) -> VisionData:
    """Datasets, samplers, loaders and Mixup for this process."""
    train, val = build_datasets(cfg, synthetic)
    batch = batch_per_process or per_process_batch(int(cfg.trainer.batch_size), ctx.world_size)
    a = cfg.augment
    if a.repeated_aug:
        base = RepeatAugSampler(
            train, num_replicas=ctx.world_size, rank=ctx.rank, num_repeats=int(a.repeats)
        )
    else:
        base = DistributedSampler(
            train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=int(cfg.seed)
        )
    sampler = ResumableSampler(base)
    workers = int(cfg.data.num_workers if num_workers is None else num_workers)
    pin = bool(cfg.data.pin_memory) and torch.cuda.is_available()
    loader_kw = {"num_workers": workers, "pin_memory": pin, "persistent_workers": False}
    train_loader = DataLoader(train, batch_size=batch, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(
        val,
        batch_size=int(cfg.trainer.eval_batch_size),
        sampler=ShardSampler(len(val), ctx.rank, ctx.world_size),
        **loader_kw,
    )
    mixup = None
    if float(a.mixup) > 0 or float(a.cutmix) > 0:
        if batch % 2:  # timm's Mixup pairs each image with the batch read backwards
            raise ConfigError(
                f"trainer.batch_size={cfg.trainer.batch_size}: {batch} images per process, but "
                "Mixup / CutMix need an even batch on every process; pick a batch that splits "
                "into even shares, or augment.mixup=0 augment.cutmix=0"
            )
        mixup = Mixup(
            mixup_alpha=float(a.mixup),
            cutmix_alpha=float(a.cutmix),
            prob=float(a.mixup_prob),
            switch_prob=float(a.mixup_switch_prob),
            mode=a.mixup_mode,
            label_smoothing=float(cfg.trainer.label_smoothing),
            num_classes=int(cfg.data.num_classes),
        )
    steps = len(sampler) // batch
    if steps == 0:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size}: {len(sampler)} training images per "
            f"process are less than one batch of {batch}; give a smaller trainer.batch_size"
        )
    return VisionData(train_loader, val_loader, sampler, mixup, batch, steps, len(train), synthetic)


def total_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    return int(cfg.trainer.epochs) * steps_per_epoch


def paper_steps_per_epoch(train_size: int, global_batch: int) -> int:
    """Optimiser steps per epoch at a global batch, dropping the last partial batch."""
    return max(1, math.floor(train_size / global_batch))

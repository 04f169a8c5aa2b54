"""The vision data pipeline from timm's parts: image-folder datasets, the DeiT transforms
(``create_transform``: RandAugment, random erasing), Mixup / CutMix, the repeated-
augmentation sampler, and a resumable wrapper around the samplers.

ImageNet and the smoke digits go through the same code; only the config differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from timm.data import ImageDataset, Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from experiments.runtime import REPO_ROOT, DistributedContext

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class DataLayoutError(FileNotFoundError):
    """The data root is missing or not an image-folder tree."""


def data_root(cfg: DictConfig) -> Path:
    root = Path(str(cfg.data.root)).expanduser()
    return root if root.is_absolute() else REPO_ROOT / root


def check_image_folder(root: Path, splits: tuple[str, ...], prepare_command: str) -> None:
    """Raise :class:`DataLayoutError` naming the expected layout unless every split of
    ``root`` is a folder of class folders holding images."""
    layout = (
        f"expected an image-folder tree:\n  {root}/<split>/<class>/<image>  "
        f"for splits {', '.join(splits)} (e.g. {root}/train/n01440764/xxx.JPEG)\n"
        f"build it with: {prepare_command}   (or point data.root=... at an existing tree)"
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


def ensure_data(cfg: DictConfig) -> Path:
    """The checked data root; the digits tree is written on first use (cached, atomically)."""
    root = data_root(cfg)
    if cfg.data.name == "digits":
        from experiments.data.digits import write_digits

        write_digits(root)
    check_image_folder(root, (cfg.data.train_split, cfg.data.val_split), cfg.data.prepare_command)
    return root


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
    train = ImageDataset(str(root / cfg.data.train_split), transform=train_tf)
    val = ImageDataset(
        str(root / cfg.data.val_split), transform=eval_tf, class_map=_class_map(train)
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
        raise ValueError(
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
        raise ValueError(f"{len(sampler)} training images per process < one batch of {batch}")
    return VisionData(train_loader, val_loader, sampler, mixup, batch, steps, len(train), synthetic)


def total_steps(cfg: DictConfig, steps_per_epoch: int) -> int:
    return int(cfg.trainer.epochs) * steps_per_epoch


def paper_steps_per_epoch(train_size: int, global_batch: int) -> int:
    """Optimiser steps per epoch at a global batch, dropping the last partial batch."""
    return max(1, math.floor(train_size / global_batch))

"""The vision app's config (``configs/vision.yaml``): DeiT on ImageNet or digits, timm."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from experiments.config.schemas.base import (
    App,
    AttentionPath,
    Below1,
    Count,
    NonNegative,
    NormalizerName,
    PosInt,
    Positive,
    Section,
    Share,
    Text,
    cross,
)


def _timm_optimizer(name: str) -> str:
    from timm.optim import list_optimizers  # timm takes seconds to import: only vision asks

    known = list(list_optimizers())
    if name not in known:
        raise PydanticCustomError("choice", "{choices}", {"choices": known})
    return name


class VisionData(Section):
    kind: Literal["vision"]
    name: Text
    root: Text
    train_split: Text
    val_split: Text
    num_classes: Annotated[int, Field(ge=2)]
    train_size: PosInt
    val_size: PosInt
    img_size: PosInt
    in_chans: PosInt
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    interpolation: Text
    mean: list[float]
    std: list[float]
    num_workers: Count
    bad_images: Literal["refuse", "skip"]
    pin_memory: bool
    prepare_command: Text


class VisionModel(Section):
    kind: Literal["vision"]
    name: Text
    output_normalizer: NormalizerName
    attention_impl: AttentionPath
    drop_path: Below1
    drop: Below1


class Augment(Section):
    auto_augment: Text | None
    color_jitter: NonNegative
    hflip: Share
    scale: list[float]
    ratio: list[float]
    reprob: Share
    remode: Literal["pixel", "rand", "const"]
    recount: PosInt
    mixup: NonNegative
    cutmix: NonNegative
    mixup_prob: Share
    mixup_switch_prob: Share
    mixup_mode: Literal["batch", "pair", "elem"]
    repeated_aug: bool
    repeats: PosInt
    no_aug: bool = None


class Optim(Section):
    opt: Annotated[Text, AfterValidator(_timm_optimizer)] = Field(description="timm's names")
    lr_base: Positive = Field(description="scaled by trainer.batch_size / optim.lr_base_batch")
    lr_base_batch: PosInt
    weight_decay: NonNegative
    eps: Positive
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
    clip_grad: Positive | None
    sched: Literal["cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd"]
    warmup_epochs: Count
    warmup_lr: NonNegative
    min_lr: NonNegative


class Trainer(Section):
    epochs: PosInt = Field(description="training epochs")
    batch_size: PosInt = Field(description="the global batch")
    eval_batch_size: PosInt
    label_smoothing: Below1
    amp: Literal["auto", "bfloat16", "float16", "none"]
    compile: bool
    ema: bool
    ema_decay: Annotated[float, Field(gt=0, lt=1)]
    eval_every_epochs: PosInt
    checkpoint_every_steps: PosInt
    log_every_steps: PosInt
    stop_after_steps: PosInt | None
    inject_nan_at_step: PosInt | None
    device: Literal["auto", "cpu", "cuda"]
    threads: PosInt | None
    dry_run_world_size: PosInt
    dry_run_cpu_batch: PosInt
    procs_per_node: PosInt | Literal["auto"]


class Vision(App):
    data: VisionData
    model: VisionModel
    augment: Augment
    optim: Optim
    trainer: Trainer

    @model_validator(mode="after")
    def _mixup_pairs_the_batch(self) -> Vision:
        """timm's Mixup / CutMix mixes each image with the batch read backwards, which needs
        an even batch on every process."""
        a, batch = self.augment, self.trainer.batch_size
        if (a.mixup > 0 or a.cutmix > 0) and batch % 2:
            raise cross(
                f"trainer.batch_size={batch}: Mixup / CutMix (augment.mixup={a.mixup}, "
                f"augment.cutmix={a.cutmix}) pair the images of a batch, so it must be even; "
                f"use trainer.batch_size={batch + 1 if batch > 1 else 2} or augment.mixup=0 "
                "augment.cutmix=0"
            )
        return self

"""The parts of a DeiT run, built from the config with timm's factories: the registered
DeiT-GAP model, the optimiser on multimax's parameter groups, the warm-up cosine schedule,
the output normaliser's loss, device and mixed precision, and the data."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

import multimax
import multimax.integrations.timm  # noqa: F401 - registers the DeiT-GAP models
from experiments.core.errors import ConfigError
from experiments.core.setup import DistributedContext, normalizer_options, seed_everything
from experiments.pipelines.vision.data import VisionData, build_data
from multimax.integrations.timm import GapVisionTransformer

# The resolved config of a run, written into its run dir (read back by ``trained``).
RESOLVED_CONFIG = "resolved_config.yaml"


def build_model(cfg: DictConfig) -> GapVisionTransformer:
    """The configured timm model (registered by ``multimax.integrations.timm``)."""
    attn, attn_options = normalizer_options(cfg, "attention")
    out, out_options = normalizer_options(cfg, "output")
    fidelity = cfg.get("fidelity") or {}  # configs/fidelity/: the paper's text or the authors' code
    d = cfg.data
    data_settings = {  # in model.pretrained_cfg, so checkpoints and exports carry them
        "num_classes": int(d.num_classes),
        "input_size": (int(d.in_chans), int(d.img_size), int(d.img_size)),
        "mean": tuple(d.mean),
        "std": tuple(d.std),
        "crop_pct": float(d.crop_pct),
        "interpolation": str(d.interpolation),
    }
    return timm.create_model(
        cfg.model.name,
        pretrained_cfg_overlay=data_settings,
        qkv_bias=bool(fidelity.get("qkv_bias", True)),
        sigma_init=OmegaConf.to_container(fidelity.sigma_init) if fidelity else None,
        num_classes=int(cfg.data.num_classes),
        img_size=int(cfg.data.img_size),
        in_chans=int(cfg.data.in_chans),
        drop_rate=float(cfg.model.drop),
        drop_path_rate=float(cfg.model.drop_path),
        normalizer=attn,
        normalizer_options=attn_options,
        output_normalizer=out,
        output_normalizer_options=out_options,
        attention_impl=cfg.model.attention_impl,
    )


def learning_rate(cfg: DictConfig) -> float:
    """DeiT's linear scaling: lr_base · global_batch / lr_base_batch."""
    o = cfg.optim
    return float(o.lr_base) * int(cfg.trainer.batch_size) / int(o.lr_base_batch)


def build_optimizer(cfg: DictConfig, model: GapVisionTransformer) -> torch.optim.Optimizer:
    """timm's optimiser factory on multimax's groups (no decay: σ scalars, biases, norms,
    pos_embed)."""
    o = cfg.optim
    groups = multimax.param_groups(
        model, float(o.weight_decay), extra_no_decay=model.no_weight_decay()
    )
    return create_optimizer_v2(
        groups,
        opt=o.opt,
        lr=learning_rate(cfg),
        weight_decay=float(o.weight_decay),
        eps=float(o.eps),
        betas=tuple(o.betas),
    )


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Cosine with linear warm-up, updated every step (timm's scheduler factory)."""
    o = cfg.optim
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=o.sched,
        num_epochs=int(cfg.trainer.epochs),
        warmup_epochs=int(o.warmup_epochs),
        warmup_lr=float(o.warmup_lr),
        min_lr=float(o.min_lr),
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def build_loss(cfg: DictConfig, model: GapVisionTransformer, mixup: bool) -> nn.Module:
    """The output normaliser's loss (sharing its σ): soft targets under Mixup / CutMix."""
    if mixup:  # Mixup applies the label smoothing itself; its soft targets go to the same loss
        return multimax.build_loss(model.output_normalizer)
    return multimax.build_loss(
        model.output_normalizer, label_smoothing=float(cfg.trainer.label_smoothing)
    )


def resolve_device(cfg: DictConfig, ctx: DistributedContext) -> torch.device:
    choice = cfg.trainer.device
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device=cuda: no CUDA device is visible; use trainer.device=auto or cpu"
        )
    return ctx.device


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    choice = str(cfg.trainer.amp)
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Parts:
    model: GapVisionTransformer  # the module itself (unwrapped)
    train_model: nn.Module  # what the loop calls: DDP and / or compiled
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    data: VisionData
    device: torch.device
    dtype: torch.dtype | None


def build_parts(
    cfg: DictConfig,
    ctx: DistributedContext,
    synthetic: bool = False,
    batch_per_process: int | None = None,
    num_workers: int | None = None,
) -> Parts:
    device = resolve_device(cfg, ctx)
    seed_everything(int(cfg.seed))  # identical initial weights on every process
    model = build_model(cfg).to(device)
    data = build_data(cfg, ctx, synthetic, batch_per_process, num_workers)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, data.steps_per_epoch)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = ModelEmaV3(model, decay=float(cfg.trainer.ema_decay)) if cfg.trainer.ema else None
    train_model: nn.Module = model
    if ctx.is_distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.trainer.compile:
        train_model = torch.compile(train_model)
    loss_fn = build_loss(cfg, model, data.mixup is not None)
    return Parts(
        model, train_model, ema, optimizer, scheduler, scaler, loss_fn, data, device, dtype
    )

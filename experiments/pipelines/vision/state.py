"""What a vision checkpoint holds and how a run continues from it: model, EMA, optimiser,
scheduler, scaler, the sampler position (epoch, batches done) and every process's RNG
states, so a rerun in the same run dir continues where the last one stopped (exactly at
epoch ends and with ``data.num_workers=0``; mid-epoch with loader workers the data order
continues exactly, the workers' augmentation draws do not). The run directory side (which
checkpoint reads, the lock, the clock) is :class:`experiments.core.rundir.RunDir`.

A checkpoint also records what rebuilds its model (architecture, model arguments, data
settings) and keeps the EMA weights where timm's loaders look for them, so timm and
:func:`multimax.integrations.timm.create_model_from_checkpoint` load it as it is
(docs/sharing_models.md)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from experiments.core.rundir import save_checkpoint
from experiments.core.setup import DistributedContext, seed_everything
from experiments.core.tracking import WANDB_ID_FILE
from experiments.pipelines.vision.parts import Parts
from multimax.integrations.timm_checkpoints import (
    EMA_KEY,
    LEGACY_EMA_KEY,
    WEIGHTS_KEY,
    model_card,
)


def rng_state() -> dict:
    """This process's RNG states in types that load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Each epoch's augmentation / dropout stream is a function of (seed, epoch, rank)."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def gather(obj: Any, ctx: DistributedContext) -> list:
    if not ctx.is_distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def save_state(
    parts: Parts,
    ctx: DistributedContext,
    run_dir: Path,
    epoch: int,
    batches: int,
    step: int,
    best: dict,
    last_eval: dict,
) -> None:
    """Write the checkpoint (rank 0) after gathering every process's RNG state."""
    rngs = gather(rng_state(), ctx)
    if not ctx.is_main:
        return
    id_file = run_dir / WANDB_ID_FILE
    state = {
        **model_card(parts.model),  # architecture, model arguments, data settings: timm rebuilds it
        WEIGHTS_KEY: parts.model.state_dict(),
        EMA_KEY: parts.ema.state_dict() if parts.ema is not None else None,
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "sampler": {"epoch": epoch, "batches_done": batches},
        "step": step,
        "best": best,
        "last_eval": last_eval,
        "rng": rngs,
        "world_size": ctx.world_size,
        "wandb_run_id": id_file.read_text().strip() if id_file.exists() else None,
    }
    save_checkpoint(state, run_dir)


def restore(parts: Parts, state: dict) -> None:
    """Load a checkpoint's model, EMA, optimiser, scheduler and scaler into ``parts``."""
    parts.model.load_state_dict(state[WEIGHTS_KEY])
    ema = state.get(EMA_KEY, state.get(LEGACY_EMA_KEY))
    if parts.ema is not None and ema is not None:
        parts.ema.load_state_dict(ema)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])


def resumed_rng(state: dict | None, ctx: DistributedContext) -> dict | None:
    """This process's saved RNG state when resuming mid-epoch with the same process count."""
    if state is None or not state["sampler"]["batches_done"]:
        return None  # epoch starts re-seed from (seed, epoch, rank)
    if state.get("world_size") == ctx.world_size:
        return state["rng"][ctx.rank]
    print(
        f"[rank {ctx.rank}] resuming mid-epoch with {ctx.world_size} processes from a checkpoint "
        f"of {state.get('world_size')}: this epoch's random streams are re-seeded"
    )
    seed_everything(epoch_seed(int(state["step"]), state["sampler"]["epoch"], ctx.rank))
    return None

"""The DeiT training loop for ``experiments.vision``, read top to bottom: build the parts,
resume if the run dir has a checkpoint, train with evaluation every epoch, write results.

Checkpoints hold model, EMA, optimiser, scheduler, scaler, the sampler position and every
process's RNG states, so a rerun in the same run dir continues where the last one stopped
(exactly, at epoch ends and with ``data.num_workers=0``; mid-epoch with loader workers the
data order continues exactly, the workers' augmentation draws do not).
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn

import multimax
import multimax.integrations.timm  # noqa: F401 - registers the DeiT-GAP models
from experiments.core.console import dry_run_report
from experiments.core.errors import STOP_EXIT_CODE, ConfigError
from experiments.core.io import atomic_write_text
from experiments.core.results import RESULTS_FILE, RunResult, write_results
from experiments.core.rundir import (
    CHECKPOINT_LAST,
    CHECKPOINT_PREVIOUS,
    RunClock,
    RunLock,
    finished_result,
    load_checkpoint,
    resume_hint,
    save_checkpoint,
    trim_metrics_log,
)
from experiments.core.setup import (
    DistributedContext,
    init_distributed,
    normalizer_options,
    seed_everything,
)
from experiments.core.tracking import WANDB_ID_FILE, finish_wandb, init_wandb, log_metrics
from experiments.pipelines.vision.data import (
    DataLayoutError,
    VisionData,
    build_data,
    data_root,
    paper_steps_per_epoch,
    per_process_batch,
)
from multimax.integrations.timm import GapVisionTransformer

RESOLVED_CONFIG = "resolved_config.yaml"
STOP_EXIT_CODE = STOP_EXIT_CODE


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


# --- parts ------------------------------------------------------------------------------------


def build_model(cfg: DictConfig) -> GapVisionTransformer:
    """The configured timm model (registered by ``multimax.integrations.timm``)."""
    attn, attn_options = normalizer_options(cfg, "attention")
    out, out_options = normalizer_options(cfg, "output")
    return timm.create_model(
        cfg.model.name,
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


# --- RNG and checkpoint state ------------------------------------------------------------------


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
    ctx,
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
        "model": parts.model.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
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


def load_state(parts: Parts, ctx, run_dir: Path) -> dict | None:
    state = load_checkpoint(run_dir, map_location="cpu")
    if state is None:
        return None
    parts.model.load_state_dict(state["model"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.load_state_dict(state["ema"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    return state


def resumed_rng(state: dict | None, ctx) -> dict | None:
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


# --- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: GapVisionTransformer, parts: Parts, ctx) -> dict[str, float]:
    """Top-1 / top-5 (%) and the loss on the validation set, summed over processes.

    Predictions rank classes by the output normaliser's transformed scores, which order the
    classes exactly as the predictive distribution does (without its ties at zero)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=parts.device)  # top1, top5, loss, count
    nll = multimax.build_loss(model.output_normalizer, reduction="sum")
    for images, targets in parts.data.val_loader:
        images = images.to(parts.device, non_blocking=True)
        targets = targets.to(parts.device, non_blocking=True)
        with autocast(parts.device, parts.dtype):
            logits = model(images)
        scores = model.ranking_scores(logits)
        top = scores.topk(min(5, scores.shape[-1]), dim=-1).indices
        hits = top == targets[:, None]
        totals += torch.stack(
            [
                hits[:, 0].sum().double(),
                hits.any(-1).sum().double(),
                nll(logits.float(), targets).double(),
                torch.tensor(float(len(targets)), dtype=torch.float64, device=parts.device),
            ]
        )
    if ctx.is_distributed:
        dist.all_reduce(totals)
    top1, top5, loss, count = totals.tolist()
    model.train()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "val_loss": loss / count}


# --- training ----------------------------------------------------------------------------------


def _mean_over_processes(value: Tensor, ctx) -> float:
    if ctx.is_distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_step(parts: Parts, cfg: DictConfig, images: Tensor, targets: Tensor, step: int, ctx):
    """One optimiser step; returns the loss averaged over processes (a float)."""
    images = images.to(parts.device, non_blocking=True)
    targets = targets.to(parts.device, non_blocking=True)
    if parts.data.mixup is not None:
        images, targets = parts.data.mixup(images, targets)
    with autocast(parts.device, parts.dtype):
        logits = parts.train_model(images)
    loss = parts.loss_fn(logits.float(), targets)
    if cfg.trainer.inject_nan_at_step is not None and step + 1 == int(
        cfg.trainer.inject_nan_at_step
    ):
        loss = loss * float("nan")
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    loss_value = _mean_over_processes(loss.detach(), ctx)  # every process sees a NaN together
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(
            f"loss is {loss_value} at step {step + 1}; stopping without a step or a checkpoint "
            "(the last good checkpoint is kept)"
        )
    if cfg.optim.clip_grad is not None:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.model.parameters(), float(cfg.optim.clip_grad))
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    if parts.ema is not None:
        parts.ema.update(parts.model, step=step + 1)
    parts.scheduler.step_update(num_updates=step + 1)
    return loss_value


def train(cfg: DictConfig, run_dir: Path) -> RunResult | None:
    """Train (or resume) in ``run_dir``; returns the result (rank 0), or None when stopped
    early by ``trainer.stop_after_steps``."""
    ctx = init_distributed()
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    run_dir = Path(run_dir)
    if ctx.is_distributed:  # a ${now:...} run dir may differ by a second between processes
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    parts = build_parts(cfg, ctx)  # checks the data first: a refused run writes nothing
    data = parts.data
    seed = int(cfg.seed)
    epochs, total = int(cfg.trainer.epochs), int(cfg.trainer.epochs) * data.steps_per_epoch
    finished = finished_result(run_dir, total)
    if finished is not None:
        if ctx.is_main:
            print(
                f"{run_dir} holds a finished run (top1 {finished.metric_value}, {finished.steps} "
                "steps): nothing to do. Give another hydra.run.dir=... for a new run."
            )
        return finished
    lock = RunLock(run_dir) if ctx.is_main else None
    with lock or nullcontext():
        if ctx.is_main:
            config = OmegaConf.to_yaml(cfg, resolve=True)
            atomic_write_text(run_dir / RESOLVED_CONFIG, config)
        return _train(cfg, run_dir, ctx, parts, seed, epochs, total)


def _train(cfg: DictConfig, run_dir: Path, ctx, parts: Parts, seed: int, epochs: int, total: int):
    data = parts.data
    had_checkpoint = any(
        (run_dir / name).exists() for name in (CHECKPOINT_LAST, CHECKPOINT_PREVIOUS)
    )
    state = load_state(parts, ctx, run_dir)
    resume_rng = resumed_rng(state, ctx)
    step, epoch, batches_done, best = 0, 0, 0, {"top1": float("-inf")}
    if state is not None:
        step, best = int(state["step"]), dict(state["best"])
        epoch, batches_done = state["sampler"]["epoch"], state["sampler"]["batches_done"]
        if ctx.is_main:
            print(f"resuming from {run_dir} at step {step} (epoch {epoch}, batch {batches_done})")
    elif had_checkpoint and ctx.is_main:
        print(f"no readable checkpoint in {run_dir}: starting over from step 0")
    clock = RunClock(run_dir, start_over=state is None) if ctx.is_main else None
    if ctx.is_main:
        trim_metrics_log(run_dir, step)
    wandb_run = init_wandb(cfg, run_dir) if ctx.is_main else None
    stop_after = cfg.trainer.stop_after_steps
    stop_at = step + int(stop_after) if stop_after is not None else None
    every_ckpt, every_log = (
        int(cfg.trainer.checkpoint_every_steps),
        int(cfg.trainer.log_every_steps),
    )
    metrics: dict[str, float] = dict(state.get("last_eval", {})) if state else {}
    start_wall, start_step = time.perf_counter(), step
    window_time, window_images = time.perf_counter(), 0
    train_images, train_seconds = 0, 0.0  # images/s over training steps only
    if ctx.is_main:
        print(
            f"training {cfg.model.name} ({sum(p.numel() for p in parts.model.parameters()):,} "
            f"parameters; attention {normalizer_options(cfg)[0]}, output "
            f"{normalizer_options(cfg, 'output')[0]}) on {data.train_size:,} images, "
            f"{epochs} epochs x {data.steps_per_epoch} steps, {ctx.world_size} process(es) on "
            f"{parts.device.type}, global batch {data.batch_per_process * ctx.world_size}"
        )
    parts.model.train()
    try:
        while epoch < epochs:
            if batches_done == 0:
                seed_everything(epoch_seed(seed, epoch, ctx.rank))
            data.sampler.start(epoch, batches_done * data.batch_per_process)
            batches = iter(data.train_loader)
            if resume_rng is not None:  # after iter(): creating it draws a seed
                set_rng_state(resume_rng)
                resume_rng = None
            for images, targets in batches:
                if batches_done >= data.steps_per_epoch:
                    break
                loss = train_step(parts, cfg, images, targets, step, ctx)
                step += 1
                batches_done += 1
                window_images += len(images) * ctx.world_size
                if step % every_log == 0 or batches_done == data.steps_per_epoch:
                    now = time.perf_counter()
                    rate = window_images / max(now - window_time, 1e-9)
                    train_images += window_images
                    train_seconds += now - window_time
                    eta = (now - start_wall) / (step - start_step) * (total - step)
                    lr = parts.optimizer.param_groups[0]["lr"]
                    window_time, window_images = now, 0
                    if ctx.is_main:
                        print(
                            f"epoch {epoch + 1}/{epochs} step {step}/{total} loss {loss:.4f} "
                            f"lr {lr:.2e} {rate:,.0f} img/s eta {_duration(eta)}",
                            flush=True,
                        )
                        log_metrics(
                            run_dir,
                            step,
                            {"train_loss": loss, "lr": lr, "images_per_s": rate, "epoch": epoch},
                            wandb_run,
                        )
                        clock.tick(min_interval=5.0)
                epoch_end = batches_done == data.steps_per_epoch
                if epoch_end:
                    if (epoch + 1) % int(cfg.trainer.eval_every_epochs) == 0 or epoch + 1 == epochs:
                        metrics = evaluate(parts.model, parts, ctx)
                        if parts.ema is not None:
                            ema = evaluate(parts.ema.module, parts, ctx)
                            metrics.update({f"ema_{k}": v for k, v in ema.items()})
                        best["top1"] = max(best["top1"], metrics["top1"])
                        if ctx.is_main:
                            print(
                                f"epoch {epoch + 1}/{epochs} eval top1 {metrics['top1']:.2f} "
                                f"top5 {metrics['top5']:.2f} val_loss {metrics['val_loss']:.4f}",
                                flush=True,
                            )
                            log_metrics(run_dir, step, {**metrics, "epoch": epoch + 1}, wandb_run)
                    epoch, batches_done = epoch + 1, 0
                if epoch_end or step % every_ckpt == 0 or step == stop_at:
                    save_state(parts, ctx, run_dir, epoch, batches_done, step, best, metrics)
                    if clock is not None:
                        clock.tick()
                if epoch_end:  # images/s counts training only, not evaluation or saving
                    window_time = time.perf_counter()
                if step == stop_at:
                    if ctx.is_main:
                        print(
                            f"stopped after {stop_after} steps (trainer.stop_after_steps) at step "
                            f"{step}; {resume_hint(run_dir)}"
                        )
                    finish_wandb(wandb_run)
                    return None
                if epoch_end:
                    break
    except NonFiniteLoss as err:
        if ctx.is_main:
            print(f"ERROR: {err}; run dir {run_dir}", flush=True)
        finish_wandb(wandb_run)
        raise
    if not ctx.is_main:
        return None
    wall = clock.total()
    mean_rate = train_images / train_seconds if train_seconds > 0 else float("nan")
    reasons = {} if train_seconds > 0 else {"train_images_per_s": "no training step in this run"}
    attn_paths = ", ".join(parts.model.attention_paths()) or "unknown"
    result = RunResult(
        task="image_classification",
        dataset=str(cfg.data.name),
        model=str(cfg.model.name),
        normalizer=normalizer_options(cfg, "attention")[0],
        output_normalizer=normalizer_options(cfg, "output")[0],
        seed=seed,
        metric_name="top1",
        metric_value=float(metrics.get("top1", float("nan"))),
        steps=step,
        wall_seconds=wall,
        profile=str(cfg.profile.name),
        metrics={**metrics, "best_top1": best["top1"], "train_images_per_s": mean_rate},
        null_reasons=reasons,
    )
    write_results(run_dir, result, cfg)
    clock.tick()
    if wandb_run is not None:
        wandb_run.summary.update({**result.metrics, "attention_path": attn_paths})
    finish_wandb(wandb_run, result)
    print(
        f"done: top1 {result.metric_value:.2f} top5 {metrics.get('top5', float('nan')):.2f} "
        f"in {_duration(wall)}, {mean_rate:,.0f} train img/s -> {run_dir / RESULTS_FILE}"
        f" | attention path: {attn_paths}"
    )
    return result


# --- dry run -------------------------------------------------------------------------------------


def dry_run(cfg: DictConfig) -> str:
    """Build the configured model / optimiser / data pipeline, time two training steps on this
    device, and print what the full schedule would cost (``experiments.core.console.dry_run_report``).

    Without torchrun the job is assumed to run on ``trainer.dry_run_world_size`` devices of
    this kind, each with batch ``trainer.batch_size / world``; on a CPU the step is measured
    at ``trainer.dry_run_cpu_batch`` images and scaled linearly to that batch.
    """
    ctx = init_distributed()
    world = ctx.world_size if ctx.is_distributed else int(cfg.trainer.dry_run_world_size)
    per_device = per_process_batch(int(cfg.trainer.batch_size), world)
    device = resolve_device(cfg, ctx)
    measured = (
        per_device if device.type == "cuda" else min(per_device, int(cfg.trainer.dry_run_cpu_batch))
    )
    try:
        from experiments.pipelines.vision.data import ensure_data

        ensure_data(cfg)
        synthetic = False
    except DataLayoutError:
        synthetic = True
        print(f"[dry run] no data at {data_root(cfg)}: random images of the real shapes")
    workers = min(int(cfg.data.num_workers), os.cpu_count() or 1)
    parts = build_parts(cfg, ctx, synthetic, batch_per_process=measured, num_workers=workers)
    parts.data.sampler.start(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = iter(parts.data.train_loader)
    parts.model.train()
    times = []
    for step in range(2):
        images, targets = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(parts, cfg, images, targets, step, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    step_seconds = times[-1] * per_device / measured
    steps = int(cfg.trainer.epochs) * paper_steps_per_epoch(
        int(cfg.data.train_size), int(cfg.trainer.batch_size)
    )
    text = dry_run_report(
        task=f"image_classification: {cfg.model.name}, attention "
        f"{normalizer_options(cfg)[0]}, output {normalizer_options(cfg, 'output')[0]}"
        f", attention path {', '.join(parts.model.attention_paths())}",
        parameters=sum(p.numel() for p in parts.model.parameters()),
        items_per_step=int(cfg.trainer.batch_size),
        item_name="images",
        step_seconds=step_seconds,
        total_steps=steps,
        device=device,
        world_size=world,
    )
    if measured != per_device:
        extra = (
            f"  (step measured at batch {measured} on the CPU: {times[-1]:.3f} s, scaled x"
            f"{per_device / measured:g} to the per-device batch {per_device})"
        )
        print(extra)
        text += "\n" + extra
    return text

"""The DeiT training loop for ``experiments.vision``, read top to bottom: build the parts
(``parts``), open the run directory (:class:`experiments.core.rundir.RunDir`: finished?,
lock, resume point, clock, metrics log), restore the checkpoint (``state``), train with
evaluation every epoch, write results. Also the dry run (two timed steps, the cost estimate).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import multimax
from experiments.core.console import dry_run_report, fidelity_line
from experiments.core.errors import INTERRUPTED_EXIT_CODE
from experiments.core.io import atomic_write_text
from experiments.core.per_example import save_image_correctness
from experiments.core.results import RESULTS_FILE, RunResult
from experiments.core.rundir import CHECKPOINT_LAST, RunDir, latest_checkpoint
from experiments.core.setup import init_distributed, normalizer_options, seed_everything
from experiments.core.signals import (
    exit_after_save,
    stop_at_step_ends,
    stop_requested,
    stopped_line,
)
from experiments.core.tracking import (
    commit_metrics,
    finish_wandb,
    init_wandb,
    log_metrics,
    under,
)
from experiments.pipelines.vision.data import (
    DataLayoutError,
    data_root,
    ensure_data,
    paper_steps_per_epoch,
    per_process_batch,
)
from experiments.pipelines.vision.parts import (
    RESOLVED_CONFIG,
    Parts,
    autocast,
    build_parts,
    resolve_device,
)
from experiments.pipelines.vision.state import (
    epoch_seed,
    restore,
    resumed_rng,
    save_state,
    set_rng_state,
)
from multimax.integrations.timm import GapVisionTransformer


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


# --- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: GapVisionTransformer, parts: Parts, ctx, record_to: Path | None = None
) -> dict[str, float]:
    """Top-1 / top-5 (%) and the loss on the validation set, summed over processes; with
    ``record_to`` (a run directory) each image's top-1 correctness is kept there, in the
    validation set's order (``experiments.core.per_example``).

    Predictions rank classes by the output normaliser's transformed scores, which order the
    classes exactly as the predictive distribution does (without its ties at zero)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=parts.device)  # top1, top5, loss, count
    correct: list[Tensor] = []
    nll = multimax.build_loss(model.output_normalizer, reduction="sum")
    for images, targets in parts.data.val_loader:
        images = images.to(parts.device, non_blocking=True)
        targets = targets.to(parts.device, non_blocking=True)
        with autocast(parts.device, parts.dtype):
            logits = model(images)
        scores = model.ranking_scores(logits)
        top = scores.topk(min(5, scores.shape[-1]), dim=-1).indices
        hits = top == targets[:, None]
        correct.append(hits[:, 0].cpu())
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
    if record_to is not None:
        _save_correctness(record_to, torch.cat(correct), parts, ctx)
    model.train()
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "val_loss": loss / count}


def _save_correctness(run_dir: Path, correct: Tensor, parts: Parts, ctx) -> None:
    """Every process's correctness in the validation set's order (the main process writes)."""
    indices = list(parts.data.val_loader.sampler)
    shards = [(indices, correct.numpy())]
    if ctx.is_distributed:
        shards = [None] * ctx.world_size
        dist.all_gather_object(shards, (indices, correct.numpy()))
    if ctx.is_main:
        ordered = np.zeros(sum(len(i) for i, _ in shards), dtype=bool)
        for shard_indices, shard_correct in shards:
            ordered[shard_indices] = shard_correct
        save_image_correctness(run_dir, ordered)


# --- training ----------------------------------------------------------------------------------


def _mean_over_processes(value: Tensor, ctx) -> float:
    if ctx.is_distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= ctx.world_size
    return float(value)


def _stop_signalled(ctx) -> bool:
    """Whether a stop signal came (to any process: all stop at the same step)."""
    signalled = stop_requested() is not None
    if not ctx.is_distributed:
        return signalled
    flag = torch.tensor([float(signalled)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


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
    total = int(cfg.trainer.epochs) * parts.data.steps_per_epoch
    with (
        RunDir.open(
            run_dir, total_steps=total, resume=latest_checkpoint, is_main=ctx.is_main
        ) as run,
        stop_at_step_ends(),  # SIGTERM / SIGUSR2: a checkpoint at the current step, then exit
    ):
        if run.finished is not None:
            return run.finished
        if ctx.is_main:
            atomic_write_text(run_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        return _train(cfg, run, ctx, parts)


def _train(cfg: DictConfig, run: RunDir, ctx, parts: Parts) -> RunResult | None:
    data, run_dir = parts.data, run.path
    seed, epochs = int(cfg.seed), int(cfg.trainer.epochs)
    total = epochs * data.steps_per_epoch
    state = run.resume.state
    step, epoch, batches_done, best = 0, 0, 0, {"top1": float("-inf")}
    if state is not None:
        restore(parts, state)
        step, best = int(state["step"]), dict(state["best"])
        epoch, batches_done = state["sampler"]["epoch"], state["sampler"]["batches_done"]
        if ctx.is_main:
            print(f"resuming from {run_dir} at step {step} (epoch {epoch}, batch {batches_done})")
    resume_rng = resumed_rng(state, ctx)
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
                            {"train/loss": loss, "lr": lr, "throughput": rate, "epoch": epoch},
                            wandb_run,
                        )
                        run.tick(min_interval=5.0)
                epoch_end = batches_done == data.steps_per_epoch
                if epoch_end:
                    if (epoch + 1) % int(cfg.trainer.eval_every_epochs) == 0 or epoch + 1 == epochs:
                        metrics = evaluate(parts.model, parts, ctx, record_to=run_dir)
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
                            logged = {**under("val", metrics), "epoch": epoch + 1}
                            log_metrics(run_dir, step, logged, wandb_run)
                    epoch, batches_done = epoch + 1, 0
                signalled = _stop_signalled(ctx)
                if epoch_end or step % every_ckpt == 0 or step == stop_at or signalled:
                    commit_metrics(wandb_run)  # W&B's rows up to here, before the checkpoint
                    save_state(parts, ctx, run_dir, epoch, batches_done, step, best, metrics)
                    run.tick()
                if signalled:
                    finish_wandb(wandb_run)
                    if not ctx.is_main:
                        raise SystemExit(INTERRUPTED_EXIT_CODE)
                    saved = f"checkpoint saved in {run_dir} (epoch {epoch}, batch {batches_done})"
                    exit_after_save(stopped_line(step, saved, run.resume_hint()))
                if epoch_end:  # images/s counts training only, not evaluation or saving
                    window_time = time.perf_counter()
                if step == stop_at:
                    if ctx.is_main:
                        print(
                            f"stopped after {stop_after} steps (trainer.stop_after_steps) at step "
                            f"{step}; {run.resume_hint()}"
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
    wall = run.wall_seconds()
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
    run.write_results(result, cfg)
    if wandb_run is not None:
        wandb_run.summary["attention_path"] = attn_paths
    finish_wandb(wandb_run, result, run_dir, run_dir / CHECKPOINT_LAST)
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
    reproduces = fidelity_line(cfg.get("fidelity"))
    print(reproduces)
    return text + "\n" + reproduces

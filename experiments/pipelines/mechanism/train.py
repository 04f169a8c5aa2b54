"""The mechanism study's run: train one attention layer on the retrieval task
(``experiments.pipelines.mechanism.task``) in a run directory
(:class:`experiments.core.rundir.RunDir`), then measure its attention on held-out examples
and write ``results.json`` (metric ``task_error``) and ``inspect.json`` (attention rows of
the first held-out examples, their raw scores, the learned normaliser scalars)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

import multimax
from experiments.core.io import atomic_write_text
from experiments.core.results import RunResult
from experiments.core.rundir import RunDir
from experiments.core.setup import normalizer_label, normalizer_options, seed_everything
from experiments.core.signals import (
    exit_after_save,
    stop_at_step_ends,
    stop_requested,
    stopped_line,
)
from experiments.core.tracking import finish_wandb, init_wandb, log_metrics
from experiments.pipelines.mechanism.task import (
    RetrievalAttention,
    RetrievalTask,
    evaluate,
    normalizer_parameters,
    sample_batch,
)
from multimax.normalizers import attention_layer_options

# Held-out data come from their own stream, the same for every normaliser of a seed.
EVAL_STREAM = 1_000_003


def train(cfg: DictConfig, run_dir: Path) -> RunResult:
    """Train and evaluate in ``run_dir``; a finished run there is left as it is (a run of
    seconds has no checkpoints: an unfinished one starts over, its curve cleared)."""
    with RunDir.open(run_dir, total_steps=int(cfg.train.steps)) as run, stop_at_step_ends():
        if run.finished is not None:
            return run.finished
        return _train(cfg, run)


def _train(cfg: DictConfig, run: RunDir) -> RunResult:
    run_dir = run.path
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    task = RetrievalTask(**{f.name: cfg.data[f.name] for f in dataclasses.fields(RetrievalTask)})
    name, options = normalizer_options(cfg, "attention")
    heads = attention_layer_options(name, cfg.model.heads)  # per-head parameters, where any
    model = RetrievalAttention(
        task, multimax.build_normalizer(name, **options, **heads), cfg.model.dim, cfg.model.heads
    )
    optimizer = torch.optim.Adam(
        multimax.param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr
    )
    train_stream = torch.Generator().manual_seed(cfg.seed)
    eval_data = sample_batch(
        task, cfg.data.eval_examples, torch.Generator().manual_seed(cfg.seed + EVAL_STREAM)
    )
    label = normalizer_label(*normalizer_options(cfg, "attention"))
    wandb_run = init_wandb(
        cfg, run_dir, name=f"{label}_N{task.num_items}_m{task.num_relevant}_seed{cfg.seed}"
    )

    start, cpu_start = time.perf_counter(), time.process_time()
    steps = cfg.train.steps
    for step in range(1, steps + 1):
        batch = sample_batch(task, cfg.train.batch_size, train_stream)
        loss = torch.nn.functional.mse_loss(model(batch.query, batch.items), batch.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if stop_requested() is not None:  # no checkpoint: a run of seconds starts over
            finish_wandb(wandb_run)
            exit_after_save(stopped_line(step, "nothing to save", run.resume_hint()))
        if step % cfg.train.log_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            rate = step / elapsed
            loss_share = loss.item() / task.target_variance
            print(
                f"[{label} N={task.num_items} m={task.num_relevant} seed={cfg.seed}] "
                f"step {step}/{steps} loss/Var(y) {loss_share:.4f} "
                f"{rate:.0f} steps/s ETA {(steps - step) / rate:.0f}s",
                flush=True,
            )
            log_metrics(run_dir, step, {"train/loss_over_var": loss_share}, wandb_run)

    # Held-out metrics at the training N, then at every N of eval.num_items (same model).
    results, rows = evaluate(model, task, eval_data, cfg.eval.rel_threshold)
    for n in cfg.eval.num_items or []:
        if n == task.num_items:
            continue
        task_n = dataclasses.replace(task, num_items=n)
        data_n = sample_batch(
            task_n,
            cfg.data.eval_examples,
            torch.Generator().manual_seed(cfg.seed + EVAL_STREAM + n),
        )
        at_n, _ = evaluate(model, task_n, data_n, cfg.eval.rel_threshold)
        results.update({f"N{n}/{k}": v for k, v in at_n.items()})
    results.update({f"N{task.num_items}/{k}": v for k, v in list(results.items()) if "/" not in k})
    wall = time.perf_counter() - start
    results["cpu_seconds"] = time.process_time() - cpu_start  # load-independent cost
    learned = normalizer_parameters(model.normalizer)
    for key, value in learned.items():
        if isinstance(value, float):
            results[f"normalizer/{key}"] = value
    print(
        f"[{label} N={task.num_items} m={task.num_relevant} seed={cfg.seed}] held-out: "
        + " ".join(f"{k} {results[k]:.4f}" for k in ("task_error", "residual_mass", "modes_kept"))
        + f" ({wall:.1f}s)",
        flush=True,
    )

    k = min(cfg.eval.examples_to_save, len(eval_data))
    with torch.no_grad():
        # Raw scores (before the normaliser's transform) of held-out examples, for σ plots.
        sample = eval_data.slice(0, cfg.eval.score_examples)
        scores = model.scores(sample.query, sample.items)  # (B, H, N)
    relevant = sample.relevant[:, None, :].expand_as(scores)
    inspect = {
        "normalizer": label,
        "num_items": task.num_items,
        "num_relevant": task.num_relevant,
        "seed": cfg.seed,
        "relevant": eval_data.relevant[:k].tolist(),
        "attention": rows[:k].tolist(),  # (k, H, N)
        "scores": scores[:k].tolist(),  # (k, H, N)
        "relevant_scores": scores[relevant].tolist(),
        "distractor_scores": scores[~relevant][: 20 * int(relevant.sum())].tolist(),
        "normalizer_parameters": learned,
    }
    atomic_write_text(run_dir / "inspect.json", json.dumps(inspect) + "\n")
    result = RunResult(
        task=cfg.task,
        dataset=cfg.data.name,
        model=cfg.model.name,
        normalizer=name,
        output_normalizer=normalizer_options(cfg, "output")[0],
        seed=cfg.seed,
        metric_name="task_error",
        metric_value=results["task_error"],
        steps=steps,
        wall_seconds=run.wall_seconds(),
        profile=cfg.profile.name,
        metrics=results,
    )
    run.write_results(result, cfg)
    finish_wandb(wandb_run, result, run_dir)
    return result

"""The fairseq driver behind ``experiments.language_model`` and ``experiments.translation``.

Config → fairseq command lines (``commands``) → fairseq's own ``train`` / ``generate`` /
``validate`` and our ``score_lm``, each in a child process (``stages``, ``worker``) → its
progress read from fairseq's JSON log (``progress``) → the test-split evaluation
(``evaluate``) → ``results.json``. The run directory's lifecycle (finished?, lock, resume
point, clock, metrics log, results) is :class:`experiments.core.rundir.RunDir`.

What survives which fault (the table in docs/language.md): a kill at any point resumes, with
the same command and ``hydra.run.dir``, from the newest readable checkpoint onto exactly the
batches the uninterrupted run reads (the plugin's ``multimax_*`` tasks); a rerun of a finished run
changes nothing; a non-finite loss stops with one line and exit code 3, keeping the last good
checkpoint.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.core.console import fidelity_line
from experiments.core.errors import STOP_EXIT_CODE, RunStop
from experiments.core.results import RunResult
from experiments.core.rundir import ResumePoint, RunDir, hydra_run_dir, resume_hint, stops_cleanly
from experiments.core.setup import normalizer_options
from experiments.core.signals import (
    exit_after_save,
    stop_at_step_ends,
    stop_requested,
    stopped_line,
)
from experiments.core.tracking import finish_wandb, init_wandb
from experiments.pipelines.fairseq import corpora
from experiments.pipelines.fairseq.commands import (
    CHECKPOINT_DIR,
    data_dir,
    has_cuda,
    to_dict,
    train_args,
)
from experiments.pipelines.fairseq.evaluate import (
    headline_metric,
    zero_probability_reasons,
)
from experiments.pipelines.fairseq.progress import TrainProgress
from experiments.pipelines.fairseq.stages import StageFailed, run_stage
from experiments.pipelines.fairseq.worker import parse_report
from multimax.integrations.fairseq_checkpoints import checkpoint_updates

LAST_CHECKPOINT = "checkpoint_last.pt"


def headline(cfg: DictConfig, evaluate: Callable[[DictConfig, Path, Path, TrainProgress], tuple]):
    """An app's whole work: :func:`run` with a stop on purpose as one line, returning the
    run's headline metric (``metric_value`` of ``results.json``), the objective a Hydra
    sweeper such as Optuna optimises; None for a dry run or a rank other than 0."""
    with stops_cleanly():
        result = run(cfg, evaluate)
    return result.metric_value if isinstance(result, RunResult) else None


def run(cfg: DictConfig, evaluate: Callable[[DictConfig, Path, Path, TrainProgress], tuple]):
    """Train with fairseq in ``hydra.run.dir`` (or resume there), evaluate, write
    ``results.json``; returns the :class:`RunResult` (None on ranks other than 0, the report's
    text for a dry run). A finished run is left as it is."""
    run_dir = hydra_run_dir()
    prefix = "lm" if cfg.task == "language_model" else "mt"
    if cfg.get("dry_run"):
        return dry_run(cfg, run_dir)
    is_main = _process_rank() == 0
    total = int(cfg.train.get("max_update") or 0)
    save_dir = run_dir / CHECKPOINT_DIR
    check_launch(cfg)
    with (
        RunDir.open(
            run_dir,
            total_steps=total,
            resume=lambda _: resume_point(save_dir),
            is_main=is_main,
            prefix=f"[{prefix}] ",
        ) as rundir,
        stop_at_step_ends(),  # SIGTERM / SIGUSR2: the trainer saves at its update, then exit
    ):
        if rundir.finished is not None:
            return rundir.finished
        if is_main:
            ensure_data(cfg)
        else:
            wait_for_data(cfg)
        wandb_run = init_wandb(cfg, run_dir) if is_main else None
        progress = TrainProgress(prefix, rundir, total, wandb_run)
        if total and rundir.resume_step >= total:
            progress.num_updates = progress.resumed_from = rundir.resume_step
            print(f"[{prefix}] training already reached update {rundir.resume_step}; evaluating")
        else:
            train(cfg, rundir, progress, distributed=_torchrun_world() > 1)
        if not is_main:
            return None
        try:
            if stop_requested() is None:
                result = evaluated_result(cfg, evaluate, rundir, progress)
        except StageFailed:
            if stop_requested() is None:
                raise
        if stop_requested() is not None:  # training is done; the evaluation reruns
            done = f"training is done, the test-split evaluation is left ({_last_good(save_dir)})"
            line = stopped_line(progress.num_updates, done, rundir.resume_hint())
            exit_after_save(f"[{prefix}] {line}")
        path = rundir.write_results(result, cfg)
    value = "null" if result.metric_value is None else f"{result.metric_value:.2f}"
    speed = result.metrics.get("train_tokens_per_s")
    print(
        f"[{prefix}] {result.metric_name} = {value} | "
        + (f"{speed:,.0f} train tokens/s | " if speed is not None else "")
        + f"{result.steps} updates | {result.wall_seconds:.0f} s -> {path}",
        flush=True,
    )
    finish_wandb(wandb_run, result, run_dir, save_dir / str(cfg.evaluate.checkpoint))
    return result


def check_launch(cfg: DictConfig) -> None:
    """Refuse process layouts fairseq cannot run, before the run directory is touched."""
    world = _torchrun_world()
    configured = str((cfg.get("distributed") or {}).get("world_size", "auto"))
    if not has_cuda() and world == 1 and configured not in ("auto", "1"):
        raise RunStop(
            f"distributed.world_size={configured} on a machine without GPUs: fairseq spawns one "
            "worker per GPU. On CPUs start the processes with torchrun, e.g. "
            f"torchrun --nproc_per_node={configured} -m experiments.{cfg.task} ... "
            "hydra.run.dir=DIR"
        )
    if world > 1 and not any(a.startswith("hydra.run.dir=") for a in _hydra_overrides()):
        raise RunStop(
            "under torchrun every rank must use the same run directory: give hydra.run.dir=DIR"
        )


def evaluated_result(
    cfg: DictConfig, evaluate: Callable, rundir: RunDir, progress: TrainProgress
) -> RunResult:
    """Evaluate the configured checkpoint on the test split: the run's :class:`RunResult`."""
    checkpoint = rundir.path / CHECKPOINT_DIR / str(cfg.evaluate.checkpoint)
    if not checkpoint.exists():
        raise RuntimeError(f"training finished without {checkpoint}")
    metrics, reasons = evaluate(cfg, checkpoint, rundir.path, progress)
    metrics["train_tokens_per_s"] = progress.tokens_per_second
    if not progress.wps:
        reasons["train_tokens_per_s"] = "no training update in this invocation"
    metrics.update(progress.last_valid)
    reasons.update(zero_probability_reasons(metrics))
    if progress.resumed_from is not None:
        metrics["resumed_from_update"] = float(progress.resumed_from)
    metric_name = headline_metric(cfg)
    return RunResult(
        task=str(cfg.task),
        dataset=str(cfg.data.name),
        model=str(cfg.model.name),
        normalizer=normalizer_options(cfg, "attention")[0],
        output_normalizer=normalizer_options(cfg, "output")[0],
        seed=int(cfg.seed),
        metric_name=metric_name,
        metric_value=metrics.get(metric_name),
        steps=progress.num_updates,
        wall_seconds=rundir.wall_seconds(),
        profile=str(cfg.profile.name),
        metrics=dict(metrics),
        null_reasons=reasons,
    )


def train(cfg: DictConfig, rundir: RunDir, progress: TrainProgress, distributed: bool) -> None:
    """``fairseq-train`` in a child process (holding the run directory's lock too); a stop
    on purpose (non-finite loss, a killed worker) becomes :class:`RunStop`."""
    save_dir = rundir.path / CHECKPOINT_DIR
    args = train_args(cfg, save_dir)
    if rundir.resume.state is not None:
        args += ["--restore-file", str(rundir.resume.state)]
    print(f"[{progress.prefix}] fairseq-train {shlex.join(args)}", flush=True)
    reports: list[tuple[str, Any]] = []

    def on_line(line: str) -> None:
        report = parse_report(line)
        if report is None:
            progress(line)
        else:
            reports.append(report)

    log = rundir.path / "train.log"
    try:
        if stop_requested() is None:
            run_stage("train", args, log, on_line, distributed, keep_fds=rundir.lock_fds)
    except StageFailed as err:
        if stop_requested() is None:  # else the trainer saved, or was stopped before training
            stop = training_stop(err, dict(reports), progress, save_dir)
            if stop is None:
                raise
            raise stop from None
    if stop_requested() is not None:
        saved, reached = _last_good(save_dir), resume_point(save_dir).step  # the saved update
        line = stopped_line(reached, saved, resume_hint(progress.run_dir))
        exit_after_save(f"[{progress.prefix}] {line}")


def _last_good(save_dir: Path) -> str:
    point = resume_point(save_dir)
    if point.step == 0:
        return "no checkpoint was saved yet"
    name = point.state.name if point.state else LAST_CHECKPOINT
    return f"the last good checkpoint, {save_dir / name} (update {point.step}), is kept"


_KILLED_WORKER = ("terminated with signal", "ProcessExitedException", "Connection closed by peer",
                  "Connection reset by peer", "SIGKILL")  # fmt: skip


# What a failed write looks like in fairseq's traceback, and what it means.
_DISK_FULL = {
    "No space left on device": "no space left on the device",
    "File too large": "the file-size limit was reached (ulimit -f)",
    "Disk quota exceeded": "the disk quota is used up",
}


def training_stop(
    err: StageFailed, reports: Mapping[str, Any], progress: TrainProgress, save_dir: Path
) -> RunStop | None:
    """The one-line stop for a training child that ended on purpose or was killed; None
    for any other failure (a bug: its traceback is the useful message)."""
    where = f"update {progress.num_updates}"
    if err.code == STOP_EXIT_CODE and "non_finite" in reports:
        info = reports["non_finite"]
        done = info.get("updates_done")
        update = f"update {done + 1}" if done is not None else f"an update after {where}"
        return RunStop(
            f"training stopped: the loss or its gradients became NaN/Inf at {update} "
            f"(fairseq: {info.get('error')}); {_last_good(save_dir)}. Try a lower train.lr, "
            "gradient clipping (train.clip_norm=1.0) or train.precision=fp32; then "
            f"{resume_hint(progress.run_dir)} (details: {err.log_path})",
            STOP_EXIT_CODE,
        )
    tail = "\n".join(err.tail)
    full = next((why for mark, why in _DISK_FULL.items() if mark in tail), None)
    if full is not None:
        for partial in save_dir.glob("*.pt.tmp"):  # fairseq's half-written checkpoint
            partial.unlink(missing_ok=True)
        return RunStop(
            f"training stopped after {where}: cannot write a checkpoint in {save_dir}: {full}; "
            f"{_last_good(save_dir)}. Free space (or raise the limit), then "
            f"{resume_hint(progress.run_dir)} (details: {err.log_path})",
            1,
        )
    if err.code < 0 or any(mark in tail for mark in _KILLED_WORKER):
        how = f"killed by {signal.Signals(-err.code).name}" if err.code < 0 else "a worker died"
        return RunStop(
            f"training stopped after {where}: {how}; {_last_good(save_dir)}; "
            f"{resume_hint(progress.run_dir)} (details: {err.log_path})",
            1,
        )
    return None


def resume_point(save_dir: Path) -> ResumePoint:
    """The newest readable checkpoint of a run, as a :class:`ResumePoint` whose ``state`` is
    the file to pass as ``--restore-file`` (None: fairseq's own ``checkpoint_last.pt``):
    ``checkpoint_last.pt`` when it reads, else the readable ``checkpoint*.pt`` with the most
    updates, else a fresh start (a restore file that does not exist, so fairseq
    starts over instead of failing on the unreadable ``checkpoint_last.pt``, which the first
    save then replaces)."""
    last = save_dir / LAST_CHECKPOINT
    others = sorted(p for p in save_dir.glob("checkpoint*.pt") if p.name != LAST_CHECKPOINT)
    if not last.exists() and not others:
        return ResumePoint(0)
    problem = f"{last.name} is missing"
    if last.exists():
        try:
            return ResumePoint(checkpoint_updates(last))
        except Exception as err:  # noqa: BLE001 - any unreadable file means: try an older one
            problem = f"{last} is unreadable ({_short(err)})"
    readable = []
    for path in others:
        try:
            readable.append((checkpoint_updates(path), path.name != "checkpoint_best.pt", path))
        except Exception:  # noqa: BLE001, S112 - unreadable too: not a candidate
            continue
    if readable:
        updates, _, path = max(readable)
        note = f"{problem}; resuming from {path.name} (update {updates}), the newest readable one"
        return ResumePoint(updates, path, note)
    note = f"{problem} and no other checkpoint reads; starting over from update 0"
    return ResumePoint(0, save_dir / "no_readable_checkpoint.pt", note)


def _short(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def ensure_data(cfg: DictConfig, allow_missing: bool = False) -> Path | None:
    """The prepared data-bin. Smoke corpora are generated and prepared on first use; a
    missing real corpus is an error naming the preparing command (or None if allowed)."""
    if corpora.is_prepared(cfg.data):
        return data_dir(cfg)
    if cfg.data.corpus.get("generate"):
        return corpora.prepare(cfg.data)
    if allow_missing:
        return None
    return corpora.require_prepared(cfg.data)


def wait_for_data(cfg: DictConfig, timeout_s: float = 6 * 3600) -> Path:
    """Ranks other than 0 wait for rank 0 to prepare the data (one preparation, no race)."""
    deadline = time.monotonic() + timeout_s
    while not corpora.is_prepared(cfg.data):
        if time.monotonic() > deadline:
            raise RunStop(f"rank {_process_rank()}: {data_dir(cfg)} was not prepared")
        time.sleep(2.0)
    return data_dir(cfg)


def _process_rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _torchrun_world(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE", "1")) if "RANK" in env else 1


def _hydra_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.hydra)


def dry_run(cfg: DictConfig, run_dir: Path):
    """Build the configured model, optimiser and data with fairseq, take two optimiser steps
    (random tokens of the real shapes when the data is missing) and print the estimate."""
    present = ensure_data(cfg, allow_missing=True)
    dr = to_dict(cfg.get("dry_run_options"))
    args = train_args(cfg, run_dir / CHECKPOINT_DIR)
    vocab = None
    if present is None:  # random tokens over dictionaries of the published sizes
        raw = cfg.data.get("dry_run_vocab")
        if raw is None:
            corpora.require_prepared(cfg.data)
        vocab = {"size": int(raw)} if isinstance(raw, int) else to_dict(raw)
    extra = {
        "task_name": str(cfg.task),
        "total_steps": int(cfg.train.get("max_update") or 0),
        "world_size": int(dr.get("world_size", 1)),
        "cpu_max_tokens": int(dr.get("cpu_max_tokens", 0) or 0),
        "vocab": vocab,
    }
    os.environ["MULTIMAX_DRY_RUN"] = json.dumps(extra)
    print(f"[dry run] fairseq-train {shlex.join(args)}", flush=True)
    lines: list[str] = [fidelity_line(to_dict(cfg.get("fidelity")))]
    print(lines[0], flush=True)

    def show(line: str) -> None:
        report = parse_report(line)
        if report is not None and report[0] == "text":
            lines.append(report[1])
            print(lines[-1], flush=True)

    run_stage("dry_run", args, run_dir / "dry_run.log", show)
    return "\n".join(lines)

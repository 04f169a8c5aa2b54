"""The fairseq driver behind ``experiments.language_model`` and ``experiments.translation``.

Config → fairseq command lines → fairseq's own ``train`` / ``generate`` / ``validate`` and our
``score_lm`` (``experiments.pipelines.fairseq.worker``) → parsed metrics → ``results.json``. Each stage
runs in a child process (``python -m experiments.pipelines.fairseq.worker STAGE ARGS...``). A child per
stage keeps fairseq's global state (its own Hydra instance, logging, spawned GPU workers)
away from our Hydra app, lets fairseq's own distributed launch (one worker per GPU,
torchrun's or SLURM's environment) work unchanged, and makes a crash or a kill of training
leave our process able to report. The child dies with the app (process group + parent-death
signal), and the run directory is locked while a run lives in it.

What survives which fault (docs/language.md): a kill at any point resumes, with the same
command and ``hydra.run.dir``, from the newest readable checkpoint onto exactly the batches
the uninterrupted run reads (the plugin's ``multimax_*`` tasks); a rerun of a finished run
changes nothing; a non-finite loss stops with one line and exit code 3, keeping the last good
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.core.console import verbose
from experiments.core.errors import STOP_EXIT_CODE, ConfigError, RunStop
from experiments.core.io import REPO_ROOT
from experiments.core.results import RunResult, write_results
from experiments.core.rundir import (
    RunClock,
    RunLock,
    finished_result,
    hydra_run_dir,
    resume_hint,
    trim_metrics_log,
)
from experiments.core.setup import normalizer_options
from experiments.core.tracking import finish_wandb, init_wandb, log_metrics
from experiments.pipelines.fairseq.worker import PARENT_PID_ENV, STAGES, parse_report

PLUGIN_DIR = REPO_ROOT / "multimax" / "integrations" / "fairseq_plugin"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "checkpoint_last.pt"
# Output normalisers whose evaluation distribution can give a token probability exactly 0:
# their headline LM metric is the ε-perplexity (BRIEF §6).
ZERO_PROBABILITY_OUTPUTS = ("sparsemax", "entmax15", "evsoftmax")
# Variables of torchrun / SLURM that must not reach single-process evaluation children.
_DISTRIBUTED_ENV = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


# --- config → fairseq flags ---------------------------------------------------------------------


def fairseq_flags(options: Mapping[str, Any] | None) -> list[str]:
    """``{max_tokens: 4096, fp16: true, adam_betas: "(0.9, 0.98)"}`` →
    ``["--max-tokens", "4096", "--fp16", "--adam-betas", "(0.9, 0.98)"]``.

    ``true`` is a bare flag, ``false`` / ``null`` are left out, lists become several values,
    mappings (e.g. ``eval_bleu_args``) are written as JSON.
    """
    flags: list[str] = []
    for key, value in (options or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, list | tuple):
            flags += [flag, *(str(v) for v in value)]
        elif isinstance(value, Mapping):
            flags += [flag, json.dumps(dict(value))]
        else:
            flags += [flag, str(value)]
    return flags


def _container(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def uses_plugin(cfg: DictConfig) -> bool:
    """Architectures registered by our fairseq plugin carry the ``multimax_`` prefix."""
    return str(cfg.model.arch).startswith("multimax_")


def plugin_available() -> bool:
    return (PLUGIN_DIR / "__init__.py").exists()


def normalizer_flags(cfg: DictConfig) -> list[str]:
    """``normalizer=`` / ``model.output_normalizer=`` as the plugin's model options."""
    attn, attn_opts = normalizer_options(cfg, "attention")
    out, out_opts = normalizer_options(cfg, "output")
    if not uses_plugin(cfg):
        if attn != "softmax" or out != "softmax" or attn_opts.get("learn_temperature"):
            raise ConfigError(
                f"model.arch={cfg.model.arch} is fairseq's stock architecture (softmax only); "
                f"use model.arch=multimax_{cfg.model.arch} for normalizer={attn} / "
                f"output_normalizer={out}"
            )
        return []
    return plugin_flags(attn, attn_opts, out, out_opts, cfg.model.get("attention_impl"))


# Normaliser option -> the plugin's flag (multimax/integrations/fairseq_plugin/options.py).
_OPTION_FLAGS = {"order": "--multimax-order", "temperature": "--softmax-temperature"}


def plugin_flags(
    attn: str, attn_opts: Mapping, out: str, out_opts: Mapping, impl: str | None = "auto"
) -> list[str]:
    """The plugin's flags for these normalisers: the same list as the plugin's
    ``normalizer_cli_args`` (a test checks), built without importing fairseq here: importing
    it registers fairseq's schemas in Hydra's ConfigStore (``model/transformer_lm``, ...),
    which would shadow our config files of the same names in every later composition of
    this process (Hydra multirun)."""
    merged: dict[str, Any] = {"order": 2, "temperature": 1.0, "learn_temperature": False}
    seen: dict[str, Any] = {}
    for options in (attn_opts, out_opts):
        for key, value in options.items():
            if key not in merged:
                raise ConfigError(f"normaliser option {key!r} has no fairseq plugin flag")
            if key in seen and seen[key] != value:
                raise ConfigError(
                    f"attention and output normalisers ask for different {key} "
                    f"({seen[key]!r} vs {value!r}); the fairseq flags are shared"
                )
            seen[key] = merged[key] = value
    flags = ["--attn-normalizer", attn, "--output-normalizer", out]
    flags += [_OPTION_FLAGS["order"], str(merged["order"])]
    flags += [_OPTION_FLAGS["temperature"], str(merged["temperature"])]
    flags += ["--attention-impl", str(impl or "auto")]
    if merged["learn_temperature"]:
        flags.append("--learn-temperature")
    return flags


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


PRECISIONS = ("fp32", "fp16", "amp", "bf16")


def precision_flags(precision: str | None, cuda: bool) -> list[str]:
    """``precision: fp32|fp16|amp|bf16`` → fairseq's flags; half precision only on GPUs.

    fairseq 0.12 runs ``--bf16`` on TPUs only (its options set ``--tpu`` with it, and the
    Trainer then asks for an XLA device), so ``bf16`` is refused on a CUDA machine."""
    precision = (precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise ConfigError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32" or not cuda:
        return []
    if precision == "bf16":
        raise RunStop(
            "train.precision=bf16: fairseq 0.12 runs --bf16 only on TPUs (it implies --tpu); "
            "on GPUs use train.precision=fp16 (the recipes' setting) or train.precision=amp"
        )
    return [f"--{precision}"]


def distributed_flags(
    cfg: DictConfig, env: Mapping[str, str] | None = None, cuda: bool | None = None
) -> list[str]:
    """fairseq's distributed flags for torchrun / SLURM / one node.

    * torchrun (``RANK``/``WORLD_SIZE`` set): each app's trainer joins torchrun's group as
      its rank (``env://``, no spawning); fairseq's own torchrun detection divides by the GPU
      count, so the rank and device are given explicitly.
    * SLURM with several nodes: fairseq builds the group from SLURM's variables once it has
      a port (``distributed.port``); with one task per node it spawns a worker per GPU.
    * otherwise: one node, fairseq spawns one worker per visible GPU (``world_size: auto``).

    On CPUs the group uses gloo and fairseq's ``legacy_ddp`` (PyTorch's DDP wrapper as
    fairseq configures it asks for a CUDA device id).
    """
    env = os.environ if env is None else env
    cuda = has_cuda() if cuda is None else cuda
    dist = _container(cfg.get("distributed"))
    flags = []
    torchrun = "WORLD_SIZE" in env and "RANK" in env and int(env["WORLD_SIZE"]) > 1
    if torchrun:
        flags += ["--distributed-world-size", env["WORLD_SIZE"]]
        flags += ["--distributed-rank", env["RANK"], "--device-id", env.get("LOCAL_RANK", "0")]
        flags += ["--distributed-init-method", "env://", "--distributed-no-spawn"]
    elif dist.get("world_size") not in (None, "auto"):
        flags += ["--distributed-world-size", str(dist["world_size"])]
    elif int(env.get("SLURM_NNODES", "1")) > 1:
        flags += ["--distributed-port", str(dist.get("port", 12355))]
    world = dist.get("world_size")
    several = torchrun or (world not in (None, "auto") and int(world) > 1)
    if several and not cuda:
        flags += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    return flags


def data_dir(cfg: DictConfig) -> Path:
    return Path(cfg.data.dir)


def train_args(cfg: DictConfig, save_dir: Path, cuda: bool | None = None) -> list[str]:
    """The complete ``fairseq-train`` command line for this config."""
    cuda = has_cuda() if cuda is None else cuda
    train = _container(cfg.train)
    precision = train.pop("precision", "fp32")
    args = [str(data_dir(cfg)), "--arch", str(cfg.model.arch)]
    if uses_plugin(cfg) or plugin_available():
        args += ["--user-dir", str(PLUGIN_DIR)]
    args += normalizer_flags(cfg)
    args += fairseq_flags(_container(cfg.model.get("args")))
    args += fairseq_flags(train)
    args += precision_flags(precision, cuda)
    args += ["--save-dir", str(save_dir), "--seed", str(cfg.seed)]
    args += ["--log-format", "simple", "--no-progress-bar"]
    if not cuda:
        args.append("--cpu")
    args += distributed_flags(cfg)
    return args


def check_command_lines(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """This run's fairseq command lines, ``[(program, args), ...]`` (training and the
    test-split evaluation), for fairseq's own parsers (``fairseq_worker check_args``): CPU
    flags, and paths that need not exist yet."""
    save_dir = Path(CHECKPOINT_DIR)
    checkpoint = save_dir / str(cfg.evaluate.checkpoint)
    lines = [("fairseq-train", train_args(cfg, save_dir, cuda=False))]
    if cfg.task == "language_model":
        lines.append(("fairseq-eval-lm", eval_lm_args(cfg, checkpoint, cuda=False)))
    else:
        lines.append(("fairseq-generate", generate_args(cfg, checkpoint, Path("gen"), cuda=False)))
    return lines


def parse_with_fairseq(lines: list[tuple[str, list[str]]]) -> list[tuple[str, str | None]]:
    """``[(program, argparse's error or None), ...]``: each command line parsed by fairseq's
    own parser, in a child process (importing fairseq here would register its schemas in
    Hydra's ConfigStore)."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.pipelines.fairseq.worker",
        "check_args",
        json.dumps(lines),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=child_env(distributed=False), cwd=os.getcwd()
    )
    reports = dict(r for r in map(parse_report, done.stdout.splitlines()) if r is not None)
    if "check_args" not in reports:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"fairseq's option check did not run ({tail})")
    return [(program, error) for program, error in reports["check_args"]]


def _eval_common(cfg: DictConfig, checkpoint: Path, cuda: bool) -> list[str]:
    args = [str(data_dir(cfg)), "--path", str(checkpoint)]
    if uses_plugin(cfg) or plugin_available():
        args += ["--user-dir", str(PLUGIN_DIR)]
    args += ["--distributed-world-size", "1", "--log-format", "simple", "--no-progress-bar"]
    # fairseq's default multiple of 8 silently drops the last sentences of a test set whose
    # size is not a multiple of 8 from the batches (seen with fairseq-generate 0.12.3.1)
    args += ["--required-batch-size-multiple", "1"]
    args += ["--seed", str(cfg.seed)]
    if not cuda:
        args.append("--cpu")
    return args


def eval_lm_args(cfg: DictConfig, checkpoint: Path, cuda: bool | None = None) -> list[str]:
    """``fairseq-eval-lm``'s options on the test split with the configured context window
    (run by our ``score_lm`` stage, which takes the same command line)."""
    cuda = has_cuda() if cuda is None else cuda
    return _eval_common(cfg, checkpoint, cuda) + fairseq_flags(_container(cfg.evaluate.args))


def validate_args(
    cfg: DictConfig, checkpoint: Path, subset: str, cuda: bool | None = None
) -> list[str]:
    """``fairseq-validate`` of ``checkpoint`` with its own criterion on ``subset``: the test
    split's loss, perplexity, ε-perplexity and zero-probability share."""
    cuda = has_cuda() if cuda is None else cuda
    max_tokens = int(cfg.train.get("max_tokens") or 4096)
    task = {k: cfg.train.get(k) for k in ("task", "source_lang", "target_lang")}
    args = _eval_common(cfg, checkpoint, cuda) + fairseq_flags(task)
    return [*args, "--valid-subset", subset, "--max-tokens", str(max_tokens)]


def generate_args(
    cfg: DictConfig, checkpoint: Path, results_dir: Path, cuda: bool | None = None
) -> list[str]:
    """``fairseq-generate`` (beam search) on the test split, output into ``results_dir``."""
    cuda = has_cuda() if cuda is None else cuda
    args = _eval_common(cfg, checkpoint, cuda) + fairseq_flags(_container(cfg.evaluate.args))
    return args + ["--results-path", str(results_dir)]


# --- running a stage in a child process -----------------------------------------------------------


def child_env(distributed: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("WANDB_MODE", "offline")
    env[PARENT_PID_ENV] = str(os.getpid())
    if not distributed:
        for key in _DISTRIBUTED_ENV:
            env.pop(key, None)
    return env


class StageFailed(RuntimeError):
    """A fairseq stage ended with a non-zero exit code (negative: killed by that signal)."""

    def __init__(self, stage: str, code: int, log_path: Path, tail: list[str]) -> None:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        super().__init__(
            f"fairseq {stage} failed ({how}); full log: {log_path}\n" + "\n".join(tail)
        )
        self.stage, self.code, self.log_path, self.tail = stage, code, log_path, tail


def run_stage(
    stage: str,
    args: list[str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    distributed: bool = False,
    extra_env: Mapping[str, str] | None = None,
    keep_fds: tuple[int, ...] = (),
) -> None:
    """Run one fairseq stage in a child process; every output line goes to ``log_path``
    and to ``on_line``. Raises :class:`StageFailed` with the log's tail if the stage fails.

    The child leads a process group of its own (fairseq's workers join it) and dies with
    this process (see ``experiments.pipelines.fairseq.worker``); if this process is interrupted, the
    whole group is killed. ``keep_fds`` stay open in the child (the run directory's lock)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-u", "-m", "experiments.pipelines.fairseq.worker", stage, *args]
    tail: list[str] = []
    env = {**child_env(distributed), **(extra_env or {})}
    with log_path.open("a", buffering=1) as log:  # line-buffered: complete up to a kill
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=env,
            cwd=os.getcwd(),
            start_new_session=True,
            pass_fds=keep_fds,
        )
        assert proc.stdout is not None
        echo = verbose()  # verbose=true: fairseq's own output too, not only the log
        try:
            for line in proc.stdout:
                log.write(line)
                if echo:
                    print(line, end="", flush=True)
                tail = (tail + [line.rstrip()])[-40:]
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0:
        raise StageFailed(stage, code, log_path, tail)


# --- reading fairseq's output ----------------------------------------------------------------------

_KV = re.compile(r"(\w+)[= ]([-+]?(?:inf|nan|[\d.]+(?:e[-+]?\d+)?))(?=[,\s|]|$)")


def parse_train_line(line: str) -> dict[str, float] | None:
    """Metrics of a ``train_inner`` / ``valid`` log line of ``--log-format simple``."""
    if "| train_inner |" in line:
        body = line.split("| train_inner |", 1)[1]
        body = body.split(" ", 3)[-1] if ":" in body else body
        return {k: float(v) for k, v in _KV.findall(body.split(":", 1)[-1])}
    if "| valid |" in line and "valid on" in line:
        body = line.split("subset", 1)[-1]
        return {f"valid_{k}": float(v) for k, v in _KV.findall(body)}
    return None


# Validation metrics kept in metrics.jsonl, results.json and W&B (eps_ppl / zero_prob: the
# plugin criterion's, on the evaluation distribution).
VALID_METRICS = ("valid_loss", "valid_ppl", "valid_eps_ppl", "valid_zero_prob")


class TrainProgress:
    """Turns fairseq's training log into our progress lines, ``metrics.jsonl`` and W&B."""

    def __init__(
        self,
        prefix: str,
        run_dir: Path,
        max_update: int,
        wandb_run=None,
        clock: RunClock | None = None,
    ) -> None:
        self.prefix, self.run_dir, self.max_update = prefix, run_dir, max_update
        self.wandb_run, self.clock = wandb_run, clock
        self.start = time.time()
        self.first_update: int | None = None
        self.num_updates = 0
        self.resumed_from: int | None = None
        self.wps: list[float] = []
        self.last_valid: dict[str, float] = {}

    def __call__(self, line: str) -> None:
        loaded = re.search(r"Loaded checkpoint (\S+) \(epoch \d+ @ (\d+) updates\)", line)
        if loaded:
            self.resumed_from = self.num_updates = int(loaded.group(2))
            print(f"[{self.prefix}] resumed from {loaded.group(1)} @ update {self.num_updates}")
        saved = re.search(r"Saved checkpoint (\S+) \(epoch \d+ @ (\d+) updates", line)
        if saved:
            self.num_updates = max(self.num_updates, int(saved.group(2)))
            print(f"[{self.prefix}] checkpoint saved @ update {saved.group(2)}", flush=True)
        if self.clock is not None:
            self.clock.tick(min_interval=5.0)
        metrics = parse_train_line(line)
        if not metrics:
            return
        step = int(metrics.get("num_updates", metrics.get("valid_num_updates", self.num_updates)))
        if "loss" in metrics:
            self._train(step, metrics)
        else:
            self.num_updates = max(self.num_updates, step)
            self.last_valid = metrics
            shown = " | ".join(f"{k[6:]} {metrics[k]:.3f}" for k in VALID_METRICS if k in metrics)
            print(f"[{self.prefix}] valid @ update {step} | {shown}", flush=True)
            keep = {k: v for k, v in metrics.items() if k in VALID_METRICS}
            log_metrics(self.run_dir, step, keep, self.wandb_run)

    def _train(self, step: int, metrics: dict[str, float]) -> None:
        self.num_updates = step
        if self.first_update is None:
            self.first_update, self.start = step, time.time()
            eta = ""
        else:
            rate = (step - self.first_update) / max(time.time() - self.start, 1e-9)
            left = max(self.max_update - step, 0) / rate if rate > 0 else math.inf
            eta = f" | ETA {left:.0f} s" if math.isfinite(left) else ""
        wps = metrics.get("wps", 0.0)
        self.wps.append(wps)
        total = f"/{self.max_update}" if self.max_update else ""
        print(
            f"[{self.prefix}] update {step}{total} | loss {metrics.get('loss', math.nan):.3f} | "
            f"ppl {metrics.get('ppl', math.nan):.2f} | {wps:,.0f} tokens/s | "
            f"lr {metrics.get('lr', math.nan):.2e}{eta}",
            flush=True,
        )
        keep = {k: metrics[k] for k in ("loss", "ppl", "wps", "lr", "gnorm") if k in metrics}
        log_metrics(self.run_dir, step, keep, self.wandb_run)

    @property
    def tokens_per_second(self) -> float:
        """Median training throughput (target tokens per second) over this invocation."""
        if not self.wps:
            return math.nan
        values = sorted(self.wps[1:] or self.wps)  # the first interval includes start-up
        return values[len(values) // 2]


def lm_scores(report: Mapping[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """(metrics, reasons for nulls) from the ``score_lm`` stage's report: test loss (base 2)
    and perplexity over every token (null when some token got probability 0), the
    ε-perplexity with its ε, the share of tokens with probability 0, evaluation speed."""
    tokens = int(report["tokens"])
    zeros = int(report["zero_prob_tokens"])
    loss = report.get("loss_base2")
    out: dict[str, float | None] = {
        "test_loss_base2": loss,
        "test_perplexity": None if loss is None else 2.0 ** float(loss),
        "test_eps_perplexity": 2.0 ** float(report["eps_loss_base2"]),
        "eps_perplexity_epsilon": float(report["epsilon"]),
        "test_zero_prob_share": zeros / tokens,
        "eval_tokens": float(tokens),
        "eval_tokens_per_s": tokens / max(float(report["seconds"]), 1e-9),
    }
    reasons = {}
    if loss is None:
        why = f"{zeros} of {tokens} test tokens got probability exactly 0 (see test_eps_perplexity)"
        reasons = {"test_loss_base2": why, "test_perplexity": why}
    return out, reasons


def parse_validate(lines: list[str], subset: str) -> dict[str, float]:
    """``fairseq-validate``'s summary line for ``subset``: ``{test_loss: ..., test_ppl: ...,
    test_eps_ppl: ..., test_zero_prob: ...}`` (prefixed by the subset's name)."""
    for line in reversed(lines):
        if f"valid on '{subset}' subset" in line:
            body = line.split("subset", 1)[-1]
            return {f"{subset}_{k}": float(v) for k, v in _KV.findall(body)}
    raise RuntimeError(f"fairseq-validate printed no summary for {subset!r}")


def read_generation(path: Path) -> tuple[dict[int, str], dict[int, str], float | None]:
    """Hypotheses and targets by sentence id (BPE removed by ``--remove-bpe``) and fairseq's
    tokenised BLEU4 from a ``fairseq-generate`` results file."""
    hyps: dict[int, str] = {}
    refs: dict[int, str] = {}
    bleu = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("H-"):
            idx, _score, text = (line[2:].split("\t") + ["", ""])[:3]
            hyps[int(idx)] = text
        elif line.startswith("T-"):
            idx, text = (line[2:].split("\t", 1) + [""])[:2]
            refs[int(idx)] = text
        elif m := re.search(r"BLEU4? = ([\d.]+)", line):
            bleu = float(m.group(1))
    return hyps, refs, bleu


def translation_scores(
    hyps: Mapping[int, str], raw_refs: list[str], target_lang: str
) -> dict[str, float]:
    """sacreBLEU (13a, the standard) and chrF of the Moses-detokenised hypotheses (sacremoses,
    as fairseq's ``--eval-bleu-detok moses``) against the untokenised references, in the
    test set's order."""
    import sacrebleu

    from experiments.pipelines.fairseq.translation_text import detokenize

    if len(hyps) != len(raw_refs):
        raise RuntimeError(f"{len(hyps)} hypotheses for {len(raw_refs)} references")
    detok = [detokenize(hyps[i], target_lang) for i in range(len(raw_refs))]
    bleu = sacrebleu.corpus_bleu(detok, [raw_refs])
    chrf = sacrebleu.corpus_chrf(detok, [raw_refs])
    return {"sacrebleu": float(bleu.score), "chrf": float(chrf.score)}


# --- the run -----------------------------------------------------------------------------------------


def ensure_data(cfg: DictConfig, allow_missing: bool = False) -> Path | None:
    """The prepared data-bin. Smoke corpora are generated and prepared on first use; a
    missing real corpus is an error naming the preparing command (or None if allowed)."""
    from experiments.pipelines.fairseq import fairseq_corpora as data_common

    if data_common.is_prepared(cfg.data):
        return data_dir(cfg)
    if cfg.data.corpus.get("generate"):
        return data_common.prepare(cfg.data)
    if allow_missing:
        return None
    return data_common.require_prepared(cfg.data)


def wait_for_data(cfg: DictConfig, timeout_s: float = 6 * 3600) -> Path:
    """Ranks other than 0 wait for rank 0 to prepare the data (one preparation, no race)."""
    from experiments.pipelines.fairseq import fairseq_corpora

    deadline = time.monotonic() + timeout_s
    while not fairseq_corpora.is_prepared(cfg.data):
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


def headline_metric(cfg: DictConfig) -> str:
    """The run's ``metric_name``: the experiment's, except that an LM whose output
    normaliser can give a token probability 0 is ranked by its ε-perplexity (BRIEF §6)."""
    output, _ = normalizer_options(cfg, "output")
    if cfg.task == "language_model" and output in ZERO_PROBABILITY_OUTPUTS:
        return "test_eps_perplexity"
    return str(cfg.evaluate.metric)


# --- resuming --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePoint:
    """Where training continues: ``updates`` done (0: from scratch), the checkpoint fairseq
    should load (None: its own default, ``checkpoint_last.pt``) and a line for the user."""

    updates: int
    restore_file: Path | None = None
    note: str | None = None


def _short(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def resume_point(save_dir: Path) -> ResumePoint:
    """The newest readable checkpoint of a run: ``checkpoint_last.pt`` when it reads, else
    the readable ``checkpoint*.pt`` with the most updates (passed to fairseq as
    ``--restore-file``), else a fresh start (a restore file that does not exist, so fairseq
    starts over instead of failing on the unreadable ``checkpoint_last.pt``, which the first
    save then replaces)."""
    from multimax.integrations.fairseq_checkpoints import checkpoint_updates

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


def run(cfg: DictConfig, evaluate: Callable[[DictConfig, Path, Path, TrainProgress], tuple]):
    """Train with fairseq in ``hydra.run.dir`` (or resume there), evaluate, write
    ``results.json``. A finished run is left as it is."""
    run_dir = hydra_run_dir()
    prefix = "lm" if cfg.task == "language_model" else "mt"
    if cfg.get("dry_run"):
        return dry_run(cfg, run_dir)
    is_main = _process_rank() == 0
    total = int(cfg.train.get("max_update") or 0)
    finished = finished_result(run_dir, total)
    if finished is not None:
        if is_main:
            value = "null" if finished.metric_value is None else f"{finished.metric_value:.2f}"
            print(
                f"[{prefix}] {run_dir} holds a finished run ({finished.metric_name} = {value}, "
                f"{finished.steps} updates): nothing to do. Give another hydra.run.dir=... "
                "for a new run.",
                flush=True,
            )
        return finished
    cuda = has_cuda()
    world = _torchrun_world()
    configured = str((cfg.get("distributed") or {}).get("world_size", "auto"))
    if not cuda and world == 1 and configured not in ("auto", "1"):
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
    lock = RunLock(run_dir) if is_main else None
    with lock or contextlib.nullcontext():
        save_dir = run_dir / CHECKPOINT_DIR
        resume = resume_point(save_dir)
        clock = RunClock(run_dir, start_over=resume.updates == 0) if is_main else None
        if is_main:
            if resume.note:
                print(f"[{prefix}] {resume.note}", flush=True)
            trim_metrics_log(run_dir, resume.updates)
            ensure_data(cfg)
        else:
            wait_for_data(cfg)
        wandb_run = init_wandb(cfg, run_dir) if is_main else None
        progress = TrainProgress(prefix, run_dir, total, wandb_run, clock)
        if total and resume.updates >= total:
            progress.num_updates = progress.resumed_from = resume.updates
            print(f"[{prefix}] training already reached update {resume.updates}; evaluating")
        else:
            train(cfg, run_dir, resume, progress, lock, distributed=world > 1)
        if not is_main:
            return None
        checkpoint = save_dir / str(cfg.evaluate.checkpoint)
        if not checkpoint.exists():
            raise RuntimeError(f"training finished without {checkpoint}")
        metrics, reasons = evaluate(cfg, checkpoint, run_dir, progress)
        metrics["train_tokens_per_s"] = progress.tokens_per_second
        if not progress.wps:
            reasons["train_tokens_per_s"] = "no training update in this invocation"
        metrics.update(progress.last_valid)
        reasons.update(zero_probability_reasons(metrics))
        if progress.resumed_from is not None:
            metrics["resumed_from_update"] = float(progress.resumed_from)
        metric_name = headline_metric(cfg)
        attn, _ = normalizer_options(cfg, "attention")
        out, _ = normalizer_options(cfg, "output")
        assert clock is not None
        result = RunResult(
            task=str(cfg.task),
            dataset=str(cfg.data.name),
            model=str(cfg.model.name),
            normalizer=attn,
            output_normalizer=out,
            seed=int(cfg.seed),
            metric_name=metric_name,
            metric_value=metrics.get(metric_name),
            steps=progress.num_updates,
            wall_seconds=clock.total(),
            profile=str(cfg.profile.name),
            metrics=dict(metrics),
            null_reasons=reasons,
        )
        path = write_results(run_dir, result, cfg)
        clock.tick()
    if wandb_run is not None:
        wandb_run.summary.update({metric_name: result.metric_value, **result.metrics})
    value = "null" if result.metric_value is None else f"{result.metric_value:.2f}"
    speed = result.metrics.get("train_tokens_per_s")
    print(
        f"[{prefix}] {metric_name} = {value} | "
        + (f"{speed:,.0f} train tokens/s | " if speed is not None else "")
        + f"{result.steps} updates | {result.wall_seconds:.0f} s -> {path}",
        flush=True,
    )
    finish_wandb(wandb_run, result)
    return result


def zero_probability_reasons(metrics: Mapping[str, Any]) -> dict[str, str]:
    """Why an infinite perplexity / nll is infinite: targets with probability exactly 0."""
    reasons = {}
    for prefix in ("valid", "test"):
        zeros = metrics.get(f"{prefix}_zero_prob")
        for key in (f"{prefix}_ppl", f"{prefix}_nll_loss"):
            value = metrics.get(key)
            if isinstance(value, float) and math.isinf(value) and zeros:
                reasons[key] = (
                    f"infinite: {100 * zeros:.2f}% of the {prefix} targets got probability "
                    f"exactly 0 (see {prefix}_eps_ppl)"
                )
    return reasons


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.hydra)


def train(
    cfg: DictConfig,
    run_dir: Path,
    resume: ResumePoint,
    progress: TrainProgress,
    lock: RunLock | None,
    distributed: bool,
) -> None:
    """``fairseq-train`` in a child process (holding the run directory's lock too); a stop
    on purpose (non-finite loss, a killed worker) becomes :class:`RunStop`."""
    save_dir = run_dir / CHECKPOINT_DIR
    args = train_args(cfg, save_dir)
    if resume.restore_file is not None:
        args += ["--restore-file", str(resume.restore_file)]
    print(f"[{progress.prefix}] fairseq-train {shlex.join(args)}", flush=True)
    reports: list[tuple[str, Any]] = []

    def on_line(line: str) -> None:
        report = parse_report(line)
        if report is None:
            progress(line)
        else:
            reports.append(report)

    keep = (lock.fd,) if lock is not None and lock.fd is not None else ()
    try:
        run_stage("train", args, run_dir / "train.log", on_line, distributed, keep_fds=keep)
    except StageFailed as err:
        stop = training_stop(err, dict(reports), progress, save_dir)
        if stop is None:
            raise
        raise stop from None


def _last_good(save_dir: Path) -> str:
    point = resume_point(save_dir)
    if point.updates == 0:
        return "no checkpoint was saved yet"
    name = point.restore_file.name if point.restore_file else LAST_CHECKPOINT
    return f"the last good checkpoint, {save_dir / name} (update {point.updates}), is kept"


_KILLED_WORKER = ("terminated with signal", "ProcessExitedException", "Connection closed by peer",
                  "Connection reset by peer", "SIGKILL")  # fmt: skip


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
    if err.code < 0 or any(mark in tail for mark in _KILLED_WORKER):
        how = f"killed by {signal.Signals(-err.code).name}" if err.code < 0 else "a worker died"
        return RunStop(
            f"training stopped after {where}: {how}; {_last_good(save_dir)}; "
            f"{resume_hint(progress.run_dir)} (details: {err.log_path})",
            1,
        )
    return None


def evaluate_lm(cfg: DictConfig, checkpoint: Path, run_dir: Path, progress) -> tuple[dict, dict]:
    """Test perplexity and ε-perplexity over every token (``score_lm``)."""
    args = eval_lm_args(cfg, checkpoint)
    args += ["--eps-perplexity-epsilon", str(cfg.evaluate.eps_perplexity_epsilon)]
    print(f"[lm] scoring the test split with {checkpoint.name} (every token counted)", flush=True)
    reports: dict[str, Any] = {}

    def on_line(line: str) -> None:
        report = parse_report(line)
        if report is not None:
            reports[report[0]] = report[1]

    run_stage("score_lm", args, run_dir / "eval_lm.log", on_line)
    if "score_lm" not in reports:
        raise RuntimeError(f"the test scoring reported nothing; see {run_dir / 'eval_lm.log'}")
    return lm_scores(reports["score_lm"])


def evaluate_translation(
    cfg: DictConfig, checkpoint: Path, run_dir: Path, progress
) -> tuple[dict, dict]:
    results_dir = run_dir / "generate"
    out_file = results_dir / f"generate-{cfg.evaluate.args.get('gen_subset', 'test')}.txt"
    out_file.unlink(missing_ok=True)
    args = generate_args(cfg, checkpoint, results_dir)
    print(f"[mt] fairseq-generate on test ({checkpoint.name})", flush=True)
    lines: list[str] = []
    run_stage("generate", args, run_dir / "generate.log", lines.append)
    hyps, refs, tok_bleu = read_generation(out_file)
    raw = (data_dir(cfg) / f"test.raw.{cfg.data.target_lang}").read_text(encoding="utf-8")
    scores = translation_scores(hyps, raw.splitlines(), str(cfg.data.target_lang))
    if tok_bleu is not None:
        scores["tokenized_bleu"] = tok_bleu
    if cfg.data.get("compound_split_bleu"):  # fairseq's scripts/compound_split_bleu.sh
        from experiments.pipelines.fairseq.translation_text import compound_split_bleu

        ids = sorted(hyps)
        scores["compound_split_bleu"] = compound_split_bleu(
            [hyps[i] for i in ids], [refs[i] for i in ids]
        )
    for line in lines:
        if m := re.search(r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", line):
            scores["generate_tokens_per_s"] = float(m.group(2))
    scores.update(test_likelihood(cfg, checkpoint, run_dir))
    return scores, {}


def test_likelihood(cfg: DictConfig, checkpoint: Path, run_dir: Path) -> dict[str, float]:
    """The test split's teacher-forced loss, perplexity, ε-perplexity and zero-probability
    share under the evaluation distribution (``fairseq-validate`` with the checkpoint's own
    criterion): ``test_loss``, ``test_ppl``, ``test_eps_ppl``, ``test_zero_prob``, ..."""
    subset = str(cfg.evaluate.args.get("gen_subset", "test"))
    print(f"[mt] teacher-forced likelihood of the {subset} split ({checkpoint.name})", flush=True)
    lines: list[str] = []
    run_stage("validate", validate_args(cfg, checkpoint, subset), run_dir / "validate.log",
              lines.append)  # fmt: skip
    scores = parse_validate(lines, subset)
    scores["eps_perplexity_epsilon"] = float(cfg.evaluate.eps_perplexity_epsilon)
    return scores


# --- dry run -------------------------------------------------------------------------------------------


def dry_run(cfg: DictConfig, run_dir: Path):
    """Build the configured model, optimiser and data with fairseq, take two optimiser steps
    (random tokens of the real shapes when the data is missing) and print the estimate."""
    present = ensure_data(cfg, allow_missing=True)
    dr = _container(cfg.get("dry_run_options"))
    args = train_args(cfg, run_dir / CHECKPOINT_DIR)
    vocab = None
    if present is None:  # random tokens over dictionaries of the published sizes
        raw = cfg.data.get("dry_run_vocab")
        if raw is None:
            from experiments.pipelines.fairseq.corpora import require_prepared

            require_prepared(cfg.data)
        vocab = {"size": int(raw)} if isinstance(raw, int) else _container(raw)
    extra = {
        "task_name": str(cfg.task),
        "total_steps": int(cfg.train.get("max_update") or 0),
        "world_size": int(dr.get("world_size", 1)),
        "cpu_max_tokens": int(dr.get("cpu_max_tokens", 0) or 0),
        "vocab": vocab,
    }
    os.environ["MULTIMAX_DRY_RUN"] = json.dumps(extra)
    print(f"[dry run] fairseq-train {shlex.join(args)}", flush=True)
    lines: list[str] = []

    def show(line: str) -> None:
        report = parse_report(line)
        if report is not None and report[0] == "text":
            lines.append(report[1])
            print(lines[-1], flush=True)

    run_stage("dry_run", args, run_dir / "dry_run.log", show)
    return "\n".join(lines)

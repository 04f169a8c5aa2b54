"""The fairseq driver behind ``experiments.language_model`` and ``experiments.translation``.

Config → fairseq command lines → fairseq's own ``train`` / ``eval_lm`` / ``generate`` → parsed
metrics → ``results.json``. Each fairseq stage runs in a child process started as
``python -m experiments.fairseq_run STAGE ARGS...``, which calls the stage's ``cli_main``
(fairseq's Python API) in that process. A child per stage keeps fairseq's global state
(its own Hydra instance, logging, spawned GPU workers) away from our Hydra app, lets
fairseq's own distributed launch (one worker per GPU, torchrun's or SLURM's environment)
work unchanged, and makes a crash or a kill of training leave our process able to report.

Resuming: fairseq keeps ``checkpoints/checkpoint_last.pt`` in the run directory and loads it
when training starts, so rerunning the same command with the same ``hydra.run.dir``
continues the run (and the same W&B run).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments import runtime

PLUGIN_DIR = runtime.REPO_ROOT / "multimax" / "integrations" / "fairseq_plugin"
CHECKPOINT_DIR = "checkpoints"
STAGES = ("train", "eval_lm", "generate", "dry_run")
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
    attn, attn_opts = runtime.normalizer_options(cfg, "attention")
    out, out_opts = runtime.normalizer_options(cfg, "output")
    if not uses_plugin(cfg):
        if attn != "softmax" or out != "softmax" or attn_opts.get("learn_temperature"):
            raise ValueError(
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
                raise ValueError(f"normaliser option {key!r} has no fairseq plugin flag")
            if key in seen and seen[key] != value:
                raise ValueError(
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


def precision_flags(precision: str | None, cuda: bool) -> list[str]:
    """``precision: fp16|bf16|fp32`` → fairseq's flags; half precision only on GPUs."""
    precision = (precision or "fp32").lower()
    if precision not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"precision must be fp16, bf16 or fp32, got {precision!r}")
    if precision == "fp32" or not cuda:
        return []
    return [f"--{precision}"]


def distributed_flags(cfg: DictConfig, env: Mapping[str, str] | None = None) -> list[str]:
    """Let fairseq's own launcher see torchrun / SLURM.

    * torchrun (``RANK``/``WORLD_SIZE``/``MASTER_*`` set): fairseq joins that group itself.
    * SLURM with several nodes: fairseq builds the group from SLURM's variables once it has
      a port (``distributed.port``); with one task per node it spawns a worker per GPU.
    * otherwise: one node, fairseq spawns one worker per visible GPU (``world_size: auto``).
    """
    env = os.environ if env is None else env
    dist = _container(cfg.get("distributed"))
    flags = []
    if dist.get("world_size") not in (None, "auto"):
        flags += ["--distributed-world-size", str(dist["world_size"])]
    if "WORLD_SIZE" in env and "RANK" in env:
        return flags
    if int(env.get("SLURM_NNODES", "1")) > 1:
        flags += ["--distributed-port", str(dist.get("port", 12355))]
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
    """``fairseq-eval-lm`` on the test split with the configured context window."""
    cuda = has_cuda() if cuda is None else cuda
    return _eval_common(cfg, checkpoint, cuda) + fairseq_flags(_container(cfg.evaluate.args))


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
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(runtime.REPO_ROOT), env.get("PYTHONPATH")) if p
    )
    env.setdefault("WANDB_MODE", "offline")
    if not distributed:
        for key in _DISTRIBUTED_ENV:
            env.pop(key, None)
    return env


def run_stage(
    stage: str,
    args: list[str],
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    distributed: bool = False,
) -> None:
    """Run one fairseq stage in a child process; every output line goes to ``log_path``
    and to ``on_line``. Raises ``RuntimeError`` with the log's tail if the stage fails."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-u", "-m", "experiments.fairseq_run", stage, *args]
    tail: list[str] = []
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=child_env(distributed),
            cwd=os.getcwd(),
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0:
        raise RuntimeError(
            f"fairseq {stage} failed (exit {code}); full log: {log_path}\n" + "\n".join(tail)
        )


# --- reading fairseq's output ----------------------------------------------------------------------

_KV = re.compile(r"(\w+)[= ]([-+]?[\d.]+(?:e[-+]?\d+)?)\b")


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


class TrainProgress:
    """Turns fairseq's training log into our progress lines, ``metrics.jsonl`` and W&B."""

    def __init__(self, prefix: str, run_dir: Path, max_update: int, wandb_run=None) -> None:
        self.prefix, self.run_dir, self.max_update = prefix, run_dir, max_update
        self.wandb_run = wandb_run
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
        if "Traceback" in line or "Error" in line:
            print(f"[{self.prefix}] {line}", file=sys.stderr)
        metrics = parse_train_line(line)
        if not metrics:
            return
        step = int(metrics.get("num_updates", metrics.get("valid_num_updates", self.num_updates)))
        if "loss" in metrics:
            self._train(step, metrics)
        else:
            self.num_updates = max(self.num_updates, step)
            self.last_valid = metrics
            shown = " | ".join(
                f"{k[6:]} {metrics[k]:.3f}" for k in ("valid_loss", "valid_ppl") if k in metrics
            )
            print(f"[{self.prefix}] valid @ update {step} | {shown}", flush=True)
            keep = {k: v for k, v in metrics.items() if k in ("valid_loss", "valid_ppl")}
            runtime.log_metrics(self.run_dir, step, keep, self.wandb_run)

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
        runtime.log_metrics(self.run_dir, step, keep, self.wandb_run)

    @property
    def tokens_per_second(self) -> float:
        """Median training throughput (target tokens per second) over this invocation."""
        if not self.wps:
            return math.nan
        values = sorted(self.wps[1:] or self.wps)  # the first interval includes start-up
        return values[len(values) // 2]


_PPL = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)")
_EVALUATED = re.compile(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")


def parse_eval_lm(lines: list[str]) -> dict[str, float]:
    """Test loss (base 2), perplexity and evaluation speed from ``fairseq-eval-lm``'s log."""
    out: dict[str, float] = {}
    for line in lines:
        if m := _PPL.search(line):
            out["test_loss_base2"], out["test_perplexity"] = float(m.group(1)), float(m.group(2))
        if m := _EVALUATED.search(line):
            out["eval_tokens"] = float(m.group(1).replace(",", ""))
            out["eval_tokens_per_s"] = float(m.group(3))
    if "test_perplexity" not in out:
        raise RuntimeError("fairseq-eval-lm printed no perplexity")
    return out


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

    from experiments.data.translation_text import detokenize

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
    from experiments.data import fairseq_corpora as data_common

    if data_common.is_prepared(cfg.data):
        return data_dir(cfg)
    if cfg.data.corpus.get("generate"):
        return data_common.prepare(cfg.data)
    if allow_missing:
        return None
    return data_common.require_prepared(cfg.data)


def _process_rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def run(cfg: DictConfig, evaluate: Callable[[DictConfig, Path, Path, TrainProgress], dict]):
    """Train with fairseq in ``hydra.run.dir``, evaluate, write ``results.json``."""
    run_dir = runtime.hydra_run_dir()
    prefix = "lm" if cfg.task == "language_model" else "mt"
    if cfg.get("dry_run"):
        return dry_run(cfg, run_dir)
    is_main = _process_rank() == 0
    start = time.time()
    ensure_data(cfg)
    wandb_run = runtime.init_wandb(cfg, run_dir) if is_main else None
    save_dir = run_dir / CHECKPOINT_DIR
    progress = TrainProgress(prefix, run_dir, int(cfg.train.get("max_update") or 0), wandb_run)
    args = train_args(cfg, save_dir)
    print(f"[{prefix}] fairseq-train {' '.join(args)}", flush=True)
    distributed = "WORLD_SIZE" in os.environ
    run_stage("train", args, run_dir / "train.log", progress, distributed=distributed)
    if not is_main:
        return None
    checkpoint = save_dir / str(cfg.evaluate.checkpoint)
    if not checkpoint.exists():
        raise RuntimeError(f"training finished without {checkpoint}")
    metrics = evaluate(cfg, checkpoint, run_dir, progress)
    metrics["train_tokens_per_s"] = progress.tokens_per_second
    if progress.last_valid:
        metrics.update(progress.last_valid)
    if progress.resumed_from is not None:
        metrics["resumed_from_update"] = float(progress.resumed_from)
    metric_name = str(cfg.evaluate.metric)
    attn, _ = runtime.normalizer_options(cfg, "attention")
    out, _ = runtime.normalizer_options(cfg, "output")
    result = runtime.RunResult(
        task=str(cfg.task),
        dataset=str(cfg.data.name),
        model=str(cfg.model.name),
        normalizer=attn,
        output_normalizer=out,
        seed=int(cfg.seed),
        metric_name=metric_name,
        metric_value=float(metrics[metric_name]),
        steps=progress.num_updates,
        wall_seconds=time.time() - start,
        profile=str(cfg.profile.name),
        metrics={k: float(v) for k, v in metrics.items()},
    )
    path = runtime.write_results(run_dir, result, cfg)
    if wandb_run is not None:
        wandb_run.summary.update({metric_name: result.metric_value, **result.metrics})
    print(
        f"[{prefix}] {metric_name} = {result.metric_value:.2f} | "
        f"{metrics['train_tokens_per_s']:,.0f} train tokens/s | {result.steps} updates | "
        f"{result.wall_seconds:.0f} s -> {path}",
        flush=True,
    )
    runtime.finish_wandb(wandb_run, result)
    return result


def evaluate_lm(cfg: DictConfig, checkpoint: Path, run_dir: Path, progress) -> dict:
    lines: list[str] = []
    args = eval_lm_args(cfg, checkpoint)
    print(f"[lm] fairseq-eval-lm on test ({checkpoint.name})", flush=True)
    run_stage("eval_lm", args, run_dir / "eval_lm.log", lines.append)
    return parse_eval_lm(lines)


def evaluate_translation(cfg: DictConfig, checkpoint: Path, run_dir: Path, progress) -> dict:
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
        from experiments.data.translation_text import compound_split_bleu

        ids = sorted(hyps)
        scores["compound_split_bleu"] = compound_split_bleu(
            [hyps[i] for i in ids], [refs[i] for i in ids]
        )
    for line in lines:
        if m := re.search(r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", line):
            scores["generate_tokens_per_s"] = float(m.group(2))
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
            from experiments.data.fairseq_corpora import require_prepared

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
    print(f"[dry run] fairseq-train {' '.join(args)}", flush=True)
    lines: list[str] = []

    def show(line: str) -> None:
        if line.startswith(_REPORT_MARK):
            lines.append(line[len(_REPORT_MARK) :])
            print(lines[-1], flush=True)

    run_stage("dry_run", args, run_dir / "dry_run.log", show)
    return "\n".join(lines)


_REPORT_MARK = "@dry-run@ "  # the child's report lines, told apart from fairseq's own output


def _report(text: str) -> None:
    for line in text.splitlines():
        print(_REPORT_MARK + line, flush=True)


def _worker_dry_run(argv: list[str]) -> None:
    """In the child: fairseq's own task / model / criterion / Trainer, two ``train_step``s."""
    import torch
    from fairseq import options, tasks
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    extra = json.loads(os.environ.get("MULTIMAX_DRY_RUN", "{}"))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    cuda = torch.cuda.is_available() and not cfg.common.cpu
    max_tokens = int(cfg.dataset.max_tokens)
    update_freq = int(cfg.optimization.update_freq[0])
    micro_tokens = max_tokens
    if not cuda and extra.get("cpu_max_tokens"):
        micro_tokens = min(max_tokens, extra["cpu_max_tokens"])
    vocab = extra.get("vocab")
    torch.manual_seed(0)

    def dictionary(size: int) -> Dictionary:
        d = Dictionary()
        for i in range(size - len(d)):
            d.add_symbol(f"tok{i}")
        return d

    is_lm = cfg.task._name == "language_modeling"
    if vocab:
        task_cls = tasks.TASK_REGISTRY[cfg.task._name]
        if is_lm:
            d = dictionary(int(vocab["size"]))
            task = task_cls(cfg.task, d, d)
        else:
            task = task_cls(cfg.task, dictionary(int(vocab["src"])), dictionary(int(vocab["tgt"])))
        _report("[dry run] data missing: random tokens of the real shapes, published vocabularies")
    else:
        task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)

    def random_sample() -> dict:
        pad, n_vocab = task.target_dictionary.pad(), len(task.target_dictionary)
        if is_lm:
            seq = int(cfg.task.tokens_per_sample)
            bsz = max(1, micro_tokens // seq)
            tokens = torch.randint(4, n_vocab, (bsz, seq))
            net_input = {"src_tokens": tokens, "src_lengths": torch.full((bsz,), seq)}
            target = torch.roll(tokens, -1, dims=1)
        else:
            seq = int(extra.get("mt_sentence_tokens", 32))
            bsz = max(1, micro_tokens // seq)
            src = torch.randint(4, len(task.source_dictionary), (bsz, seq))
            target = torch.randint(4, n_vocab, (bsz, seq))
            target[:, -1] = task.target_dictionary.eos()
            prev = torch.cat([target[:, -1:], target[:, :-1]], dim=1)
            net_input = {
                "src_tokens": src,
                "src_lengths": torch.full((bsz,), seq),
                "prev_output_tokens": prev,
            }
        del pad
        return {
            "id": torch.arange(bsz),
            "nsentences": bsz,
            "ntokens": int(target.numel()),
            "net_input": net_input,
            "target": target,
        }

    if vocab:
        batches = [random_sample() for _ in range(2)]
    else:
        task.load_dataset(cfg.dataset.train_subset, epoch=1)
        itr = trainer.get_train_iterator(epoch=1, load_dataset=False).next_epoch_itr(shuffle=True)
        batches = [next(itr) for _ in range(2)]
        if micro_tokens < max_tokens:  # CPU: a slice of the real batch, extrapolated below
            batches = [random_sample() for _ in range(2)]
    times = []
    for sample in batches:
        t0 = time.perf_counter()
        trainer.train_step([sample])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_tokens = max_tokens * update_freq
    # per optimiser step = update_freq micro-batches of max_tokens each
    scale = update_freq * max_tokens / max(1, int(batches[-1]["ntokens"]))
    if micro_tokens < max_tokens or vocab:
        scale = update_freq * max_tokens / micro_tokens
    step_seconds = times[-1] * scale
    params = sum(p.numel() for p in model.parameters())
    device = torch.device("cuda") if cuda else torch.device("cpu")
    from experiments.runtime import dry_run_report

    world = int(extra.get("world_size", 1))
    with contextlib.redirect_stdout(io.StringIO()):
        report = dry_run_report(
            task=f"{extra.get('task_name', cfg.task._name)} ({cfg.model._name})",
            parameters=params,
            items_per_step=step_tokens * world,
            item_name="tokens",
            step_seconds=step_seconds,
            total_steps=int(extra.get("total_steps") or cfg.optimization.max_update or 0),
            device=device,
            world_size=world,
        )
    _report(report)
    _report(
        f"  measured:          {times[-1]:.3f} s for one micro-batch of "
        f"{int(batches[-1]['ntokens']):,} tokens (x{scale:.1f} = one update of "
        f"{step_tokens:,} tokens per device); parameters finite after the steps: "
        f"{all(bool(p.detach().isfinite().all()) for p in model.parameters())}"
    )


# --- child-process entry point -------------------------------------------------------------------------


def _allow_checkpoint_types() -> None:
    """fairseq loads checkpoints with torch's ``weights_only=True`` default: allow-list the
    few non-tensor types they may hold (the plugin does the same when it is imported)."""
    import argparse

    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])


def _worker(argv: list[str]) -> None:
    stage, args = argv[0], argv[1:]
    _allow_checkpoint_types()
    if stage == "dry_run":
        _worker_dry_run(args)
        return
    module = {"train": "train", "eval_lm": "eval_lm", "generate": "generate"}[stage]
    import importlib

    cli = importlib.import_module(f"fairseq_cli.{module}")
    sys.argv = [f"fairseq-{module.replace('_', '-')}", *args]
    cli.cli_main()


if __name__ == "__main__":
    _worker(sys.argv[1:])

"""Config → fairseq command lines: the flags of ``fairseq-train``, ``fairseq-eval-lm`` (our
``score_lm``), ``fairseq-validate`` and ``fairseq-generate`` for a composed config, and the
check of those lines by fairseq's own parsers.

Progress is asked for as ``--log-format json`` (``experiments.pipelines.fairseq.progress``
reads it). Nothing here imports fairseq: importing it registers fairseq's schemas in Hydra's
ConfigStore (``model/transformer_lm``, ...), which would shadow our config files of the same
names in every later composition of this process (Hydra multirun).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.core.errors import ConfigError, RunStop
from experiments.core.io import REPO_ROOT
from experiments.core.setup import normalizer_options
from experiments.pipelines.fairseq.stages import child_env
from experiments.pipelines.fairseq.worker import parse_report

PLUGIN_DIR = REPO_ROOT / "multimax" / "integrations" / "fairseq_plugin"

CHECKPOINT_DIR = "checkpoints"
# fairseq's progress output, read by experiments.pipelines.fairseq.progress
LOG_FLAGS = ["--log-format", "json", "--no-progress-bar"]


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


def to_dict(node) -> dict:
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


def fidelity_flags(cfg: DictConfig) -> list[str]:
    """``fidelity.*`` (``configs/fidelity/``) as the plugin's flags: the attention kinds σ acts
    in, what beam search uses, how σ starts (docs/fidelity.md); none for a stock architecture."""
    fidelity = to_dict(cfg.get("fidelity"))
    if not fidelity or not uses_plugin(cfg):
        return []
    init = fidelity["sigma_init"]
    flags = ["--attn-normalizer-scope", ",".join(fidelity["attention_scope"])]
    flags += ["--incremental-normalizer", str(fidelity["incremental"])]
    for layer, prefix in (("attention", "--attn"), ("output", "--output")):
        flags += [f"{prefix}-sigma-init", str(init[layer]["kind"])]
        flags += [f"{prefix}-sigma-init-std", str(init[layer]["std"])]
    return flags


def has_cuda() -> bool:
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
    dist = to_dict(cfg.get("distributed"))
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
    train = to_dict(cfg.train)
    precision = train.pop("precision", "fp32")
    if to_dict(cfg.get("fidelity")).get("sigma_weight_decay") and train.get("optimizer") == (
        "multimax_adam"
    ):
        train["optimizer"] = "adam"  # fairseq's own Adam decays every parameter, σ's too
    args = [str(data_dir(cfg)), "--arch", str(cfg.model.arch)]
    if uses_plugin(cfg) or plugin_available():
        args += ["--user-dir", str(PLUGIN_DIR)]
    args += normalizer_flags(cfg) + fidelity_flags(cfg)
    args += fairseq_flags(to_dict(cfg.model.get("args")))
    args += fairseq_flags(train)
    args += precision_flags(precision, cuda)
    args += ["--save-dir", str(save_dir), "--seed", str(cfg.seed)]
    args += LOG_FLAGS
    if not cuda:
        args.append("--cpu")
    args += distributed_flags(cfg)
    return args


def _eval_common(cfg: DictConfig, checkpoint: Path, cuda: bool) -> list[str]:
    args = [str(data_dir(cfg)), "--path", str(checkpoint)]
    if uses_plugin(cfg) or plugin_available():
        args += ["--user-dir", str(PLUGIN_DIR)]
    args += ["--distributed-world-size", "1", *LOG_FLAGS]
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
    return _eval_common(cfg, checkpoint, cuda) + fairseq_flags(to_dict(cfg.evaluate.args))


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
    args = _eval_common(cfg, checkpoint, cuda) + fairseq_flags(to_dict(cfg.evaluate.args))
    return args + ["--results-path", str(results_dir)]


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

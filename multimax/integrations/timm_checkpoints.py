"""Sharing a trained DeiT-GAP the ways timm loads models.

A vision run's checkpoint holds, beside its weights, what rebuilds the model: the registered
``architecture``, the ``model_args`` it was created with (normalisers, their options, σ
initialisation, sizes: what :func:`timm.create_model` recorded, less the drop rates) and the
run's data settings as a ``pretrained_cfg`` (classes, input size, mean / std, crop), under
the names timm's ``config.json`` uses. The trained weights are under ``model`` and the EMA
weights, when the run kept them, under ``state_dict_ema``: where timm's
``load_state_dict(use_ema=True)`` looks first. With that, all of these rebuild the run's model:

* ``multimax.integrations.timm.create_model_from_checkpoint(path)`` (``use_ema=True`` for the
  EMA weights): this module is the checkpoint's format and imports no model code;
* ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``: the
  registered entry points read the recorded arguments (:func:`saved_model_args`); timm's
  file loader takes the EMA weights when there are any (its ``use_ema=True`` default);
* ``timm.create_model(name, checkpoint_path=path, **read_model_card(path)["model_args"])``:
  timm builds before it reads ``checkpoint_path``, so the arguments are given;
* :func:`export_for_hf` (``scripts/export_model.py``) writes timm's Hugging Face layout,
  ``config.json`` + ``model.safetensors``, which ``timm.create_model("local-dir:DIR",
  pretrained=True)`` loads (after ``import multimax.integrations.timm``) and
  ``timm.models.push_to_hf_hub`` / ``huggingface_hub.upload_folder`` publish.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import clean_state_dict, resolve_pretrained_cfg, save_for_hf
from timm.models._input import get_model_args  # what save_for_hf records: timm's one recorder
from torch import nn

ARCHITECTURE_KEY = "architecture"
MODEL_ARGS_KEY = "model_args"
PRETRAINED_CFG_KEY = "pretrained_cfg"
WEIGHTS_KEY = "model"  # timm's load_state_dict reads "state_dict", else "model"
EMA_KEY = "state_dict_ema"  # timm's load_state_dict(use_ema=True) looks here first
LEGACY_EMA_KEY = "ema"  # checkpoints written before the EMA moved to EMA_KEY
# The data settings a loaded model carries in its pretrained_cfg (timm.data.resolve_data_config)
DATA_CFG_KEYS = ("num_classes", "input_size", "mean", "std", "crop_pct", "interpolation")


def model_card(model: nn.Module) -> dict[str, Any]:
    """What rebuilds ``model`` (created by :func:`timm.create_model`): architecture, model
    arguments and data settings, in types that load with ``weights_only=True``."""
    cfg = model.pretrained_cfg
    return {
        ARCHITECTURE_KEY: cfg["architecture"],
        MODEL_ARGS_KEY: get_model_args(model),
        PRETRAINED_CFG_KEY: {k: cfg[k] for k in DATA_CFG_KEYS if cfg.get(k) is not None},
    }


def load_checkpoint_file(path: str | Path, mmap: bool = False) -> dict:
    """A vision checkpoint, read with ``weights_only=True`` on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_model_card(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """The :func:`model_card` a checkpoint (a path or a loaded dict) records."""
    state = checkpoint
    if not isinstance(checkpoint, Mapping):
        state = load_checkpoint_file(checkpoint, mmap=True)
    if not isinstance(state, Mapping) or ARCHITECTURE_KEY not in state:
        where = checkpoint if not isinstance(checkpoint, Mapping) else "this checkpoint"
        raise ValueError(
            f"{where} records no architecture or model arguments (written before they were "
            "saved): build the model with the run's settings and pass checkpoint_path= to "
            "timm.create_model, or rerun the training to write a checkpoint that has them"
        )
    return {k: state[k] for k in (ARCHITECTURE_KEY, MODEL_ARGS_KEY, PRETRAINED_CFG_KEY)}


def checkpoint_weights(state: Mapping[str, Any], use_ema: bool = False) -> dict:
    """The state dict to load: the EMA weights when ``use_ema`` and the run kept them, else
    the trained ones (timm's rule), with DDP / compile / EMA-wrapper prefixes removed."""
    ema = state.get(EMA_KEY, state.get(LEGACY_EMA_KEY))
    weights = ema if use_ema and ema is not None else state[WEIGHTS_KEY]
    return clean_state_dict(weights)


def saved_model_args(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` of a registered entry point called with ``pretrained=True``, completed from
    the weights' source: a checkpoint given as ``pretrained_cfg_overlay=dict(file=...)``
    supplies its recorded model arguments and data settings (the caller's win). Sources timm
    resolves itself (``local-dir:``, whose ``config.json`` timm reads; ``state_dict``, url,
    hub) pass unchanged; no source at all is refused naming the ways to give one."""
    cfg = resolve_pretrained_cfg(
        variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")
    )
    if cfg.source == "local-dir" or cfg.state_dict or cfg.url or cfg.hf_hub_id:
        return kwargs
    if not cfg.file:
        raise ValueError(
            f"{variant}: no pretrained weights given; load a trained run's with pretrained=True, "
            "pretrained_cfg_overlay=dict(file=CHECKPOINT), or timm.create_model('local-dir:DIR', "
            "pretrained=True) on an export of scripts/export_model.py (docs/sharing_models.md)"
        )
    if str(cfg.file).endswith(".safetensors"):
        return kwargs  # weights only: the model arguments are the caller's
    card = read_model_card(cfg.file)
    if card[ARCHITECTURE_KEY] != variant:
        raise ValueError(
            f"{cfg.file} holds a {card[ARCHITECTURE_KEY]}, not a {variant}: "
            f"timm.create_model('{card[ARCHITECTURE_KEY]}', pretrained=True, ...)"
        )
    kwargs = {**card[MODEL_ARGS_KEY], **kwargs}
    overlay = {**card[PRETRAINED_CFG_KEY], **(kwargs.get("pretrained_cfg_overlay") or {})}
    kwargs["pretrained_cfg_overlay"] = overlay
    return kwargs


def export_for_hf(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` in timm's Hugging Face layout (``config.json`` with its architecture,
    model arguments and data settings, ``model.safetensors``) into a new ``directory``: built
    beside it and renamed into place, so the folder is either complete or absent."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty: choose a new folder")
    temp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        save_for_hf(model, str(temp), safe_serialization=True)
        if directory.exists():
            directory.rmdir()
        os.replace(temp, directory)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory


__all__ = [
    "ARCHITECTURE_KEY",
    "EMA_KEY",
    "MODEL_ARGS_KEY",
    "PRETRAINED_CFG_KEY",
    "WEIGHTS_KEY",
    "checkpoint_weights",
    "export_for_hf",
    "load_checkpoint_file",
    "model_card",
    "read_model_card",
    "saved_model_args",
]

"""A trained vision run, loaded for analysis: its model (``multimax.record_attention()``
around a forward pass gives every layer's weights) and fixed evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from experiments.core.rundir import load_checkpoint
from experiments.pipelines.vision.data import build_datasets
from experiments.pipelines.vision.parts import RESOLVED_CONFIG, build_model
from multimax.integrations.timm import GapVisionTransformer, create_model_from_checkpoint
from multimax.integrations.timm_checkpoints import ARCHITECTURE_KEY, model_card


def load_trained_model(
    run_dir: str | Path, use_ema: bool = False, map_location: str | torch.device = "cpu"
) -> tuple[GapVisionTransformer, DictConfig]:
    """The model of a finished (or stopped) run, in eval mode, and the run's resolved config.

    Reads ``resolved_config.yaml`` and the newest readable checkpoint of ``run_dir`` and
    rebuilds the model with the package's loader
    (:func:`multimax.integrations.timm.create_model_from_checkpoint`);
    ``use_ema`` takes the EMA weights when the run kept them.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / RESOLVED_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a vision run directory?")
    cfg = OmegaConf.load(config_file)
    state = load_checkpoint(run_dir, map_location="cpu")
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {run_dir}")
    if ARCHITECTURE_KEY not in state:  # written before checkpoints recorded their model
        state = {**state, **model_card(build_model(cfg))}
    model = create_model_from_checkpoint(state, use_ema=use_ema)
    return model.to(map_location).eval(), cfg


def evaluation_batches(
    cfg: DictConfig, num_batches: int = 2, batch_size: int = 32
) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``num_batches`` (images, labels) batches of the validation split, with the
    evaluation transform (resize, centre crop, normalise): fixed, not shuffled."""
    from torch.utils.data import DataLoader

    _, val = build_datasets(cfg)
    loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=0)
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        yield batch

"""Image classification with DeiT-tiny / DeiT-small (global average pooling), any normaliser.

    python -m experiments.vision experiment=deit_tiny_imagenet [profile=smoke] [normalizer=NAME]
    torchrun --nproc_per_node=8 -m experiments.vision experiment=deit_small_imagenet
    python -m experiments.vision experiment=deit_small_imagenet dry_run=true

Compose config -> build parts (``experiments.vision_train``) -> train or resume in the Hydra
run dir -> ``results.json``. ``load_trained_model`` and ``evaluation_batches`` serve analysis
code (``multimax.record_attention()`` around a forward pass gives every layer's weights).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from experiments import runtime
from experiments.vision_launch import run_workers, worker_command
from experiments.vision_train import (
    RESOLVED_CONFIG,
    STOP_EXIT_CODE,
    NonFiniteLoss,
    build_model,
    dry_run,
    train,
)
from multimax.integrations.timm import GapVisionTransformer


@hydra.main(config_path="../configs", config_name="vision", version_base=None)
def main(cfg: DictConfig) -> float | None:
    with runtime.stops_cleanly():
        if cfg.dry_run:
            dry_run(cfg)
            return None
        run_dir = runtime.hydra_run_dir()
        workers = worker_command(cfg, list(HydraConfig.get().overrides.task), run_dir)
        if workers is not None:  # a single launcher process on a multi-GPU node: one per GPU
            run_workers(workers)
            results = run_dir / runtime.RESULTS_FILE
            return runtime.read_results(results).metric_value if results.exists() else None
        try:
            result = train(cfg, run_dir)
        except NonFiniteLoss:
            sys.exit(STOP_EXIT_CODE)
        return None if result is None else result.metric_value


def load_trained_model(
    run_dir: str | Path, use_ema: bool = False, map_location: str | torch.device = "cpu"
) -> tuple[GapVisionTransformer, DictConfig]:
    """The model of a finished (or stopped) run, in eval mode, and the run's resolved config.

    Reads ``resolved_config.yaml`` and the newest readable checkpoint of ``run_dir``;
    ``use_ema`` takes the EMA weights when the run kept them.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / RESOLVED_CONFIG
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: is {run_dir} a vision run directory?")
    cfg = OmegaConf.load(config_file)
    state = runtime.load_checkpoint(run_dir, map_location=map_location)
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {run_dir}")
    model = build_model(cfg)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    if use_ema and state.get("ema") is not None:
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    model.load_state_dict(weights)
    return model.to(map_location).eval(), cfg


def evaluation_batches(
    cfg: DictConfig, num_batches: int = 2, batch_size: int = 32
) -> Iterator[tuple[Tensor, Tensor]]:
    """The first ``num_batches`` (images, labels) batches of the validation split, with the
    evaluation transform (resize, centre crop, normalise): fixed, not shuffled."""
    from torch.utils.data import DataLoader

    from experiments.vision_data import build_datasets

    _, val = build_datasets(cfg)
    loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=0)
    for i, batch in enumerate(loader):
        if i >= num_batches:
            break
        yield batch


if __name__ == "__main__":
    main()

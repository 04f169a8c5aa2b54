"""Image classification with DeiT-tiny / DeiT-small (global average pooling), any normaliser.

    python -m experiments.vision experiment=deit_tiny_imagenet [profile=smoke] [normalizer=NAME]
    torchrun --nproc_per_node=8 -m experiments.vision experiment=deit_small_imagenet
    python -m experiments.vision experiment=deit_small_imagenet dry_run=true

Compose config -> build parts (``experiments.pipelines.vision.parts``) -> train or resume in the Hydra
run dir -> ``results.json``. ``experiments.pipelines.vision.trained`` loads a finished run for analysis
code (``multimax.record_attention()`` around a forward pass gives every layer's weights).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments.config import app_help  # noqa: F401 - registers the --help resolver
from experiments.core.errors import STOP_EXIT_CODE
from experiments.core.results import RESULTS_FILE, read_results
from experiments.core.rundir import hydra_run_dir, stops_cleanly
from experiments.pipelines.vision.launch import run_workers, worker_command
from experiments.pipelines.vision.train import NonFiniteLoss, dry_run, train


@hydra.main(config_path="../configs", config_name="vision", version_base=None)
def main(cfg: DictConfig) -> float | None:
    with stops_cleanly():
        if cfg.dry_run:
            dry_run(cfg)
            return None
        run_dir = hydra_run_dir()
        workers = worker_command(cfg, list(HydraConfig.get().overrides.task), run_dir)
        if workers is not None:  # a single launcher process on a multi-GPU node: one per GPU
            run_workers(workers)
            results = run_dir / RESULTS_FILE
            return read_results(results).metric_value if results.exists() else None
        try:
            result = train(cfg, run_dir)
        except NonFiniteLoss:
            sys.exit(STOP_EXIT_CODE)
        return None if result is None else result.metric_value


if __name__ == "__main__":
    main()

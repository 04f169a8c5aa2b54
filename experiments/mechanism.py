"""Mechanism study: train one attention layer on a retrieval task with known answers and
measure the shape of its attention (residual mass, modes kept, task error).

    python -m experiments.mechanism experiment=mechanism_retrieval normalizer=multimax
    python -m experiments.mechanism experiment=mechanism_retrieval profile=smoke logger=none

Writes ``results.json`` (task "mechanism", metric ``task_error``; the attention metrics in
``metrics``) and ``inspect.json`` (attention rows of the first held-out examples, their raw
scores, the learned normaliser scalars) into the run directory
(``experiments.pipelines.mechanism.train``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.config import app_help  # noqa: F401 - registers the --help resolver
from experiments.core.rundir import hydra_run_dir, stops_cleanly
from experiments.pipelines.mechanism.train import train


@hydra.main(config_path="../configs", config_name="mechanism", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The held-out task error (``metric_value`` of ``results.json``): a sweeper's objective."""
    with stops_cleanly():
        return train(cfg, hydra_run_dir()).metric_value


if __name__ == "__main__":
    main()

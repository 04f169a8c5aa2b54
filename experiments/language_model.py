"""WikiText-103 language modelling through fairseq.

    python -m experiments.language_model experiment=lm_wikitext103 [profile=smoke]
        [normalizer=multimax] [model.output_normalizer=softmax] [hydra.run.dir=DIR]

Trains with ``fairseq-train`` (our plugin's ``multimax_transformer_lm``), evaluates test
perplexity with ``fairseq-eval-lm`` and writes ``results.json``; rerunning with the same
``hydra.run.dir`` resumes from ``checkpoints/checkpoint_last.pt``. ``dry_run=true`` builds the
model and optimiser and times two updates instead.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.config import app_help  # noqa: F401 - registers the --help resolver
from experiments.core.results import RunResult
from experiments.core.rundir import stops_cleanly
from experiments.pipelines.fairseq import run as fairseq_run
from experiments.pipelines.fairseq.evaluate import evaluate_lm


@hydra.main(config_path="../configs", config_name="language_model", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The run's headline metric (``metric_value`` of ``results.json``): the objective a
    Hydra sweeper (e.g. Optuna) optimises; None for a dry run or a rank other than 0."""
    with stops_cleanly():
        result = fairseq_run.run(cfg, evaluate_lm)
    return result.metric_value if isinstance(result, RunResult) else None


if __name__ == "__main__":
    main()

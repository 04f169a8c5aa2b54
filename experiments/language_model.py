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
from experiments.pipelines.fairseq.evaluate import evaluate_lm
from experiments.pipelines.fairseq.run import headline


@hydra.main(config_path="../configs", config_name="language_model", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The run's headline metric, the objective of a Hydra sweeper (None for a dry run)."""
    return headline(cfg, evaluate_lm)


if __name__ == "__main__":
    main()

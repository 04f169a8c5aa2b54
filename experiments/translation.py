"""IWSLT'14 De-En and WMT'14 En-De translation through fairseq.

    python -m experiments.translation experiment=mt_iwslt14_deen|mt_wmt14_ende [profile=smoke]
        [normalizer=multimax] [model.output_normalizer=softmax] [hydra.run.dir=DIR]

Trains with ``fairseq-train`` (our plugin's ``multimax_transformer_*``), translates the test
split with ``fairseq-generate`` (beam search) and writes ``results.json`` with detokenised
sacrebleu and fairseq's tokenised BLEU; rerunning with the same ``hydra.run.dir`` resumes.
``dry_run=true`` builds the model and optimiser and times two updates instead.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments.config import app_help  # noqa: F401 - registers the --help resolver
from experiments.pipelines.fairseq.evaluate import evaluate_translation
from experiments.pipelines.fairseq.run import headline


@hydra.main(config_path="../configs", config_name="translation", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """The run's headline metric, the objective of a Hydra sweeper (None for a dry run)."""
    return headline(cfg, evaluate_translation)


if __name__ == "__main__":
    main()

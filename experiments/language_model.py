"""WikiText-103 language modelling through fairseq (BRIEF §2).

    python -m experiments.language_model experiment=lm_wikitext103 [profile=smoke]
        [normalizer=multimax] [model.output_normalizer=softmax] [hydra.run.dir=DIR]

Trains with ``fairseq-train`` (our plugin's ``multimax_transformer_lm``), evaluates test
perplexity with ``fairseq-eval-lm`` and writes ``results.json``; rerunning with the same
``hydra.run.dir`` resumes from ``checkpoints/checkpoint_last.pt``. ``dry_run=true`` builds the
model and optimiser and times two updates instead.
"""

import hydra
from omegaconf import DictConfig

from experiments.config import check  # noqa: F401 - registers the --help resolver
from experiments.core.rundir import stops_cleanly
from experiments.pipelines.fairseq import run as fairseq_run


@hydra.main(config_path="../configs", config_name="language_model", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with stops_cleanly():
        fairseq_run.run(cfg, fairseq_run.evaluate_lm)


if __name__ == "__main__":
    main()

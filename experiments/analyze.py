"""Figures from runs: what the trained normalisers do, regenerated from run directories.

    python -m experiments.analyze RUNS_DIR... --out results/figures

For every run directory (one holding a ``results.json``) under the given paths:

* training curves from its ``metrics.jsonl`` (one figure per task and profile);
* for runs whose task has a model loader (vision: ``experiments.pipelines.vision.trained.load_trained_model``)
  and a checkpoint, per model and profile, one seed per normaliser:
  - per-layer attention statistics on evaluation data (sparsity: share of weights < 1e-3
    and exact zeros; multi-modality: modes ≥ 0.5·max and second / first weight; entropy),
    from ``multimax.record_attention()`` around forward passes;
  - the learned σ of every ``multimax.MultiMax`` module against the identity;
  - attention maps on a few evaluation images (last layer, mean over heads and queries).

Every figure is written as PNG and PDF, and ``figures.md`` in ``--out`` lists them, each
with a caption line. The functions below work on any ``nn.Module`` whose attention goes
through ``multimax.attention``.
"""

import sys

from experiments.pipelines.report.figures import main

if __name__ == "__main__":
    sys.exit(main())

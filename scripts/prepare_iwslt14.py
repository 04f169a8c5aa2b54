"""Prepare IWSLT'14 De-En for fairseq (configs/data/iwslt14_deen.yaml).

    python -m scripts.prepare_iwslt14                        # from the hub (online)
    python -m scripts.prepare_iwslt14 corpus.local_path=DIR  # save_to_disk, *.parquet (the hub's layout) or *.jsonl
    python -m scripts.prepare_iwslt14 --smoke                # the generated smoke corpus

Skips when the data-bin is already prepared with the same settings. The work is done by
``experiments/pipelines/fairseq/corpora.py`` (the experiment apps call it too).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
    from experiments.pipelines.fairseq.corpora import main

    main("iwslt14_deen", "iwslt14_deen_smoke")

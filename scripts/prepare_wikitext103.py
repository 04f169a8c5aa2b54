"""Prepare WikiText-103 for fairseq (configs/data/wikitext103.yaml).

    python -m scripts.prepare_wikitext103                        # from the hub (online)
    python -m scripts.prepare_wikitext103 corpus.local_path=DIR  # wiki.*.tokens or save_to_disk
    python -m scripts.prepare_wikitext103 --smoke                # the generated smoke corpus

Skips when the data-bin is already prepared with the same settings. The work is done by
``experiments/pipelines/fairseq/corpora.py`` (the experiment apps call it too).
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, too
    from experiments.pipelines.fairseq.corpora import main

    main("wikitext103", "wikitext103_smoke")

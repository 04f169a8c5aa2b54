"""Prepare WMT'14 En-De for fairseq (configs/data/wmt14_ende.yaml).

    python -m scripts.prepare_wmt14                        # from the hub (online)
    python -m scripts.prepare_wmt14 corpus.local_path=DIR  # save_to_disk or *.jsonl/parquet
    python -m scripts.prepare_wmt14 --smoke                # the generated smoke corpus

Skips when the data-bin is already prepared with the same settings. The full corpus
(4.5 M pairs) takes hours in the pure-Python BPE learner: run it once on a CPU node.
"""

from experiments.data.fairseq_corpora import main

if __name__ == "__main__":
    main("wmt14_ende", "wmt14_ende_smoke")

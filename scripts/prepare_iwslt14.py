"""Prepare IWSLT'14 De-En for fairseq (configs/data/iwslt14_deen.yaml).

    python -m scripts.prepare_iwslt14                        # from the hub (online)
    python -m scripts.prepare_iwslt14 corpus.local_path=DIR  # save_to_disk or *.jsonl/parquet
    python -m scripts.prepare_iwslt14 --smoke                # the generated smoke corpus

Skips when the data-bin is already prepared with the same settings.
"""

from experiments.data.fairseq_corpora import main

if __name__ == "__main__":
    main("iwslt14_deen", "iwslt14_deen_smoke")

"""``--task multimax_language_modeling`` / ``multimax_translation``: fairseq's tasks, resumable
to the exact batches of an uninterrupted run.

fairseq composes an epoch iterator's batches under ``numpy_seed(seed + epoch)``, with
``epoch`` the epoch the iterator is *created* at, and reuses that iterator for every later
epoch (only the order of its batches is reshuffled, with ``seed + epoch``). An uninterrupted
run therefore trains on epoch 1's batch composition throughout, while a run resumed from a
checkpoint creates its iterator at the checkpoint's epoch and composes different batches:
after a kill and a resume it sees other data than the run it continues (seen as a test
perplexity of 5.85 vs 5.97 on the LM smoke run). These tasks compose a reusable training
iterator's batches as of epoch 1 whatever epoch it is created at; the iterator itself still
starts at, shuffles for and reports the epoch fairseq asks for. Everything else — options,
data loading, ``--eval-bleu`` — is the stock task's.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask

FIRST_EPOCH = 1


class ResumableBatchesMixin:
    """``get_batch_iterator`` with a reusable iterator's batches composed as of epoch 1."""

    def get_batch_iterator(
        self,
        dataset,
        *args,
        epoch: int = 1,
        disable_iterator_cache: bool = False,
        update_epoch_batch_itr: bool = False,
        **kwargs,
    ):
        reusable = (
            not disable_iterator_cache
            and not update_epoch_batch_itr
            and self.can_reuse_epoch_itr(dataset)
        )
        if not reusable:  # rebuilt every epoch (sharded data): fairseq's own behaviour
            return super().get_batch_iterator(
                dataset,
                *args,
                epoch=epoch,
                disable_iterator_cache=disable_iterator_cache,
                update_epoch_batch_itr=update_epoch_batch_itr,
                **kwargs,
            )
        cached = self.dataset_to_epoch_iter.get(dataset)
        iterator = super().get_batch_iterator(dataset, *args, epoch=FIRST_EPOCH, **kwargs)
        if iterator is not cached:
            iterator.epoch = max(epoch, FIRST_EPOCH)  # the epoch it serves next
        return iterator


@dataclass
class MultimaxLanguageModelingConfig(LanguageModelingConfig):
    """``language_modeling``'s options."""


@register_task("multimax_language_modeling", dataclass=MultimaxLanguageModelingConfig)
class MultimaxLanguageModelingTask(ResumableBatchesMixin, LanguageModelingTask):
    """fairseq's ``language_modeling``, resumable to the uninterrupted run's batches."""


@dataclass
class MultimaxTranslationConfig(TranslationConfig):
    """``translation``'s options."""


@register_task("multimax_translation", dataclass=MultimaxTranslationConfig)
class MultimaxTranslationTask(ResumableBatchesMixin, TranslationTask):
    """fairseq's ``translation``, resumable to the uninterrupted run's batches."""


__all__ = ["MultimaxLanguageModelingTask", "MultimaxTranslationTask", "ResumableBatchesMixin"]

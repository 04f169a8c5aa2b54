"""``--criterion multimax_label_smoothed_cross_entropy``: the library's output-layer loss.

The loss is ``multimax.build_loss(<the model's output normaliser>, label_smoothing,
ignore_index=padding, reduction="sum")``: cross-entropy of the normaliser's distribution for
softmax-like normalisers (softmax, MultiMax, evsoftmax), the Fenchel-Young loss for sparsemax
and 1.5-entmax, so sparse outputs train correctly; the normaliser's own parameters (σ,
temperature) get their gradients through it. Logged like fairseq's
``label_smoothed_cross_entropy``: ``loss``, ``nll_loss`` (base 2 per token) and ``ppl``
(``--report-accuracy`` adds accuracy).

Two differences from fairseq's criterion, both by design: label smoothing is torch's
(``(1-ε)·onehot + ε/V``; fairseq spreads ε over the V-1 other tokens), and ``nll_loss`` is
the negative log-likelihood under the output normaliser, which is infinite when a sparse
normaliser gives the target exactly zero probability. Works with fairseq's stock models too
(their output is plain softmax). Adaptive softmax has its own criterion, ``adaptive_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from torch import Tensor

from multimax import Normalizer, build_loss, build_normalizer


@dataclass
class MultimaxCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    """fairseq's ``--label-smoothing``, ``--report-accuracy``, ``--ignore-prefix-size``."""


def output_normalizer_of(model) -> Normalizer:
    """The model's output normaliser (plain softmax for fairseq's own models)."""
    normalizer = getattr(model.decoder, "output_normalizer", None)
    return normalizer if normalizer is not None else build_normalizer("softmax")


def target_nll(normalizer: Normalizer, logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Per-token −log p(target) under ``normalizer(logits)`` (0 at ``ignore_index``)."""
    if normalizer.mapping == "softmax" or normalizer.mapping == "evsoftmax":
        # cross-entropy of the training distribution: exactly -log p, computed stably
        return build_loss(normalizer, 0.0, ignore_index=ignore_index, reduction="none")(
            logits, target
        )
    probs = normalizer(logits.float())
    safe = torch.where(target == ignore_index, torch.zeros_like(target), target)
    nll = -probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).log()
    return torch.where(target == ignore_index, torch.zeros_like(nll), nll)


@register_criterion("multimax_label_smoothed_cross_entropy", dataclass=MultimaxCriterionConfig)
class MultimaxLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """fairseq's label-smoothed criterion with the loss of the model's output normaliser."""

    def compute_loss(self, model, net_output, sample, reduce: bool = True):
        if getattr(model.decoder, "adaptive_softmax", None) is not None:
            raise ValueError(
                "the model uses adaptive softmax: train it with --criterion adaptive_loss"
            )
        logits = net_output[0]
        target = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            logits = logits[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        logits = logits.reshape(-1, logits.size(-1))
        target = target.reshape(-1)
        normalizer = output_normalizer_of(model)
        loss_fn = build_loss(
            normalizer,
            self.eps,
            ignore_index=self.padding_idx,
            reduction="sum" if reduce else "none",
        )
        loss = loss_fn(logits, target)
        with torch.no_grad():
            nll_loss = target_nll(normalizer, logits, target, self.padding_idx)
        if reduce:
            nll_loss = nll_loss.sum()
        return loss, nll_loss


__all__ = [
    "MultimaxCriterionConfig",
    "MultimaxLabelSmoothedCrossEntropyCriterion",
    "output_normalizer_of",
    "target_nll",
]

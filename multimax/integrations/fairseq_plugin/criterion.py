"""``--criterion multimax_label_smoothed_cross_entropy``: the library's output-layer loss.

The loss is ``multimax.build_loss(<the model's output normaliser>, label_smoothing,
ignore_index=padding, reduction="sum")``: cross-entropy of the normaliser's distribution for
softmax-like normalisers (softmax, MultiMax, evsoftmax), the Fenchel-Young loss for sparsemax
and 1.5-entmax, so sparse outputs train correctly; the normaliser's own parameters (σ,
temperature) get their gradients through it. Logged like fairseq's
``label_smoothed_cross_entropy``: ``loss``, ``nll_loss`` (base 2 per token) and ``ppl``
(``--report-accuracy`` adds accuracy).

``nll_loss`` is −log p(target) under the distribution the model predicts *in its current
mode*: in training, the normaliser's training distribution (evsoftmax's ε-weighted one); in
validation (``model.eval()``), its evaluation distribution, where sparsemax, 1.5-entmax and
evsoftmax give some targets probability exactly 0 (``nll_loss`` and ``ppl`` are then
infinite, as they are). Validation therefore also logs, for every normaliser,

* ``eps_ppl``: the ε-perplexity of Martins, Marinho & Martins (2020),
  exp(−mean log((p + ε) / (1 + ε·|V|))), with ε = ``--eps-perplexity-epsilon`` (1e-6), and
* ``zero_prob``: the share of target tokens that got probability exactly 0.

When the plugin's decoder can fuse its output layer into the loss (an output normaliser
that is softmax of a point-wise σ, such as MultiMax: ``fuses_output_loss``), the criterion
asks the model for its features and the decoder's ``output_loss`` computes loss and nll
chunk by chunk from them (:func:`multimax.linear_sigma_cross_entropy`), so the (tokens,
vocabulary) logits are never held; softmax outputs, sparse outputs and
``--report-accuracy`` take the logits as before.

Two differences from fairseq's criterion, both by design: label smoothing is torch's
(``(1-ε)·onehot + ε/V``; fairseq spreads ε over the V-1 other tokens), and the loss of a
sparse output is its Fenchel-Young loss. Works with fairseq's stock models too (their output
is plain softmax). Adaptive softmax has its own criterion, ``adaptive_loss``.

``--inject-nan-at-update N`` (fault injection for tests of the pipelines, plugin models only)
makes the training loss NaN at update N, as a diverging run would.
"""

# No ``from __future__ import annotations``: fairseq reads the config dataclass field types.
import math
from dataclasses import dataclass, field

import torch
from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from torch import Tensor

from multimax import Normalizer, build_loss, build_normalizer
from multimax.metrics import EPSILON_PERPLEXITY_DEFAULT, epsilon_log_likelihood


@dataclass
class MultimaxCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    """fairseq's ``--label-smoothing``, ``--report-accuracy``, ``--ignore-prefix-size``, plus
    the ε of the validation ε-perplexity and a fault-injection switch."""

    eps_perplexity_epsilon: float = field(
        default=EPSILON_PERPLEXITY_DEFAULT,
        metadata={"help": "ε of the ε-perplexity logged in validation (eps_ppl)"},
    )
    inject_nan_at_update: int = field(
        default=0,
        metadata={"help": "tests only: make the training loss NaN at this update (0: off)"},
    )


def output_normalizer_of(model) -> Normalizer:
    """The model's output normaliser (plain softmax for fairseq's own models)."""
    decoder = getattr(model, "decoder", None)
    normalizer = getattr(decoder, "output_normalizer", None)
    return normalizer if normalizer is not None else build_normalizer("softmax")


def target_log_probs(
    normalizer: Normalizer, logits: Tensor, target: Tensor, ignore_index: int
) -> Tensor:
    """Per-token log p(target) under ``normalizer(logits)`` in the normaliser's current mode
    (−inf where p = 0; 0 at ``ignore_index``), in float32."""
    if normalizer.mapping == "softmax" or (
        normalizer.mapping == "evsoftmax" and normalizer.training
    ):
        # cross-entropy of the (training) distribution: exactly log p, computed stably
        loss = build_loss(normalizer, 0.0, ignore_index=ignore_index, reduction="none")
        return -loss(logits, target).float()
    probs = normalizer(logits.float())
    safe = torch.where(target == ignore_index, torch.zeros_like(target), target)
    log_p = probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).log()
    return torch.where(target == ignore_index, torch.zeros_like(log_p), log_p)


@register_criterion("multimax_label_smoothed_cross_entropy", dataclass=MultimaxCriterionConfig)
class MultimaxLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """fairseq's label-smoothed criterion with the loss of the model's output normaliser."""

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        eps_perplexity_epsilon=EPSILON_PERPLEXITY_DEFAULT,
        inject_nan_at_update=0,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        if eps_perplexity_epsilon <= 0:
            raise ValueError(f"--eps-perplexity-epsilon must be > 0, got {eps_perplexity_epsilon}")
        self.eps_perplexity_epsilon = float(eps_perplexity_epsilon)
        self.inject_nan_at_update = int(inject_nan_at_update or 0)

    def fuses_output_layer(self, model) -> bool:
        """Whether the loss comes straight from the decoder's features (the plugin decoder's
        ``output_loss``: no (tokens, vocabulary) logits): its output normaliser allows it
        (``fuses_output_loss``) and nothing here needs the logits (``--report-accuracy``
        does)."""
        fuses = getattr(getattr(model, "decoder", None), "fuses_output_loss", None)
        return callable(fuses) and bool(fuses()) and not self.report_accuracy

    def _logits_and_target(self, model, net_output, sample) -> tuple[Tensor, Tensor]:
        """(scores, target) flattened over tokens: the logits, or the decoder's features when
        the output layer is fused into the loss."""
        if getattr(model.decoder, "adaptive_softmax", None) is not None:
            raise ValueError(
                "the model uses adaptive softmax: train it with --criterion adaptive_loss"
            )
        logits = net_output[0]
        target = model.get_targets(sample, net_output)
        if self.ignore_prefix_size > 0:
            logits = logits[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        return logits.reshape(-1, logits.size(-1)), target.reshape(-1)

    def compute_loss(self, model, net_output, sample, reduce: bool = True):
        loss, nll_loss, _ = self._losses(model, net_output, sample, reduce)
        return loss, nll_loss

    def _losses(self, model, net_output, sample, reduce: bool):
        """(training loss, nll, validation statistics) for one batch. ``net_output`` holds
        the logits, or the decoder's features when :meth:`fuses_output_layer`."""
        scores, target = self._logits_and_target(model, net_output, sample)
        reduction = "sum" if reduce else "none"
        if self.fuses_output_layer(model):
            loss, nll_loss = model.decoder.output_loss(
                scores,
                target,
                label_smoothing=self.eps,
                ignore_index=self.padding_idx,
                reduction=reduction,
            )
            log_p = -nll_loss
            vocab = model.decoder.output_projection.out_features
        else:
            normalizer = output_normalizer_of(model)
            loss_fn = build_loss(
                normalizer, self.eps, ignore_index=self.padding_idx, reduction=reduction
            )
            loss = loss_fn(scores, target)
            with torch.no_grad():
                log_p = target_log_probs(normalizer, scores, target, self.padding_idx)
            nll_loss = -log_p
            vocab = scores.size(-1)
        stats: dict[str, float] = {}
        if not model.training:
            valid = target != self.padding_idx
            eps_ll = epsilon_log_likelihood(log_p[valid], self.eps_perplexity_epsilon, vocab)
            stats = {
                "eps_nll_loss": float(-eps_ll.sum()),
                "zero_prob_tokens": int((log_p[valid] == float("-inf")).sum()),
            }
        if reduce:
            nll_loss = nll_loss.sum()
        return loss, nll_loss, stats

    def forward(self, model, sample, reduce: bool = True):
        if self.fuses_output_layer(model):  # features, not logits: the loss forms no logits
            net_output = model(**sample["net_input"], features_only=True)
        else:
            net_output = model(**sample["net_input"])
        loss, nll_loss, stats = self._losses(model, net_output, sample, reduce)
        if self.inject_nan_at_update and model.training:
            updates = getattr(model, "num_updates", None)
            if updates is not None and updates + 1 == self.inject_nan_at_update:
                loss = loss * float("nan")
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
            **stats,
        }
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = utils.item(n_correct.data)
            logging_output["total"] = utils.item(total.data)
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """fairseq's metrics, plus ``eps_ppl`` and ``zero_prob`` in validation."""
        super().reduce_metrics(logging_outputs)
        if not any("eps_nll_loss" in log for log in logging_outputs):
            return
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        eps_sum = sum(log.get("eps_nll_loss", 0.0) for log in logging_outputs)
        zeros = sum(log.get("zero_prob_tokens", 0) for log in logging_outputs)
        if ntokens <= 0:
            return
        metrics.log_scalar("eps_nll_loss", eps_sum / ntokens / math.log(2), ntokens, round=3)
        metrics.log_derived(
            "eps_ppl", lambda meters: utils.get_perplexity(meters["eps_nll_loss"].avg)
        )
        metrics.log_scalar("zero_prob", zeros / ntokens, ntokens, round=4)


__all__ = [
    "MultimaxCriterionConfig",
    "MultimaxLabelSmoothedCrossEntropyCriterion",
    "output_normalizer_of",
    "target_log_probs",
]

"""Output-layer training losses, one per normaliser family.

* softmax-like normalisers (softmax, softmax with temperature, multimax, evsoftmax): the
  cross-entropy of the normaliser's *training* distribution, i.e. ``cross_entropy`` on the
  transformed logits (σ(z) for MultiMax, z / T for softmax, z + log w_ε for evsoftmax, which
  keeps every log-probability >= log ε and so stays finite);
* sparse normalisers (sparsemax, 1.5-entmax): the Fenchel-Young loss of their regulariser,

      L(z; q) = <z, p* − q> − Ω(p*) + Ω(q),   Ω(p) = (Σ_i p_i^α − 1) / (α(α − 1)),

  with p* the normaliser's output, α = 2 (sparsemax) or 1.5 (entmax); its gradient is
  p* − q. Label smoothing replaces the one-hot q by (1 − ε)·onehot + ε / V.
* α-entmax with a learned α (``entmax_alpha``): the same Fenchel-Young loss with Ω_α, α the
  normaliser's parameter; p* enters as a constant (its own derivative vanishes at the
  optimum), so the gradient is p* − q in z and −∂Ω_α(p*)/∂α + ∂Ω_α(q)/∂α in α;
* softmax with a sink logit (``softmax_sink``): −Σ q·log w with w the normaliser's weights
  (the sink's mass is a class no target has).

Normalisers whose rows are not a distribution (sigmoid, softpick, stick-breaking) have no
output-layer loss: :func:`build_loss` refuses them in one line.

For softmax of a point-wise σ (MultiMax, softmax with temperature) on large outputs, the
cross-entropy runs chunk by chunk through :mod:`multimax.chunked_loss` (same value and
gradients, no second (T, V) tensor) whenever its compiled kernels are in use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .chunked_loss import sigma_cross_entropy, supports_chunked
from .compile_policy import use_compiled_kernels
from .normalizers import (
    EVSOFTMAX_EPSILON,
    Normalizer,
    SoftmaxSink,
    build_normalizer,
    check_output_normalizer,
    entmax15_masked,
    entmax_alpha_masked,
    evsoftmax_log_weights,
    sparsemax_masked,
)
from .precision import upcast

_FY_ALPHA = {"sparsemax": 2.0, "entmax15": 1.5}
# Mappings whose loss is taken against a target distribution q (integer targets made one-hot).
_DISTRIBUTION_LOSSES = ("entmax_alpha", "softmax_sink")


def _reduce(loss: Tensor, valid: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class _FenchelYoung(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, q: Tensor, alpha: float) -> Tensor:
        p = sparsemax_masked(z) if alpha == 2.0 else entmax15_masked(z)

        def omega(r: Tensor) -> Tensor:
            return (r.clamp_min(0).pow(alpha).sum(-1) - 1) / (alpha * (alpha - 1))

        loss = ((p - q) * z).sum(-1) - omega(p) + omega(q)
        ctx.save_for_backward(p - q)
        return loss

    @staticmethod
    @once_differentiable  # p* − q is saved as a constant: a second derivative would be 0
    def backward(ctx, grad: Tensor):
        (diff,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * diff, None, None


def fenchel_young_entmax_alpha(z: Tensor, q: Tensor, alpha: Tensor) -> Tensor:
    """Per-row Fenchel-Young loss of α-entmax, L = <z, p* − q> − Ω_α(p*) + Ω_α(q), for
    z, q of shape (rows, V) and a 0-d α, with gradients in z and in α."""
    p = entmax_alpha_masked(z.detach(), alpha.detach()).detach()

    def omega(r: Tensor) -> Tensor:  # 0^α = 0, with a finite derivative in α
        positive = r > 0
        powered = torch.where(positive, torch.where(positive, r, 1.0).pow(alpha), 0.0)
        return (powered.sum(-1) - 1) / (alpha * (alpha - 1))

    return ((p - q) * z).sum(-1) - omega(p) + omega(q)


class NormalizerLoss(nn.Module):
    """Training loss of an output layer whose predictive distribution is ``normalizer(z)``.

    ``forward(logits, target)``: logits (..., V) and either integer targets (...), entries
    equal to ``ignore_index`` contributing nothing, or soft targets (..., V) whose rows are
    distributions (e.g. from Mixup / CutMix), for which the loss is −Σ q·log p_train
    (softmax family) or the Fenchel-Young loss with q (sparse family). Computed in float32 (float64 stays float64).
    ``chunked``: None (default) takes the chunked σ + cross-entropy when it helps (softmax of
    a point-wise σ other than plain softmax, with compiled kernels in use); True / False
    force it on / off.
    """

    def __init__(
        self,
        normalizer: Normalizer,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        chunked: bool | None = None,
    ) -> None:
        super().__init__()
        check_output_normalizer(getattr(normalizer, "registry_name", ""), "output normaliser")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.normalizer = normalizer
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunked = chunked
        if chunked and not supports_chunked(normalizer):
            raise ValueError(
                f"chunked=True needs softmax of a point-wise σ; {type(normalizer).__name__} is not"
            )

    def uses_chunked(self, logits: Tensor) -> bool:
        """Whether ``forward`` on these logits takes the chunked σ + cross-entropy."""
        if self.chunked is not None:
            return self.chunked
        n = self.normalizer
        plain = n.is_plain_softmax
        return supports_chunked(n) and not plain and use_compiled_kernels(logits.numel())

    def training_logits(self, logits: Tensor) -> Tensor:
        """Scores whose softmax is the normaliser's training distribution (softmax family)."""
        z = self.normalizer.transform(upcast(logits))
        if self.normalizer.mapping == "evsoftmax":
            z = z + evsoftmax_log_weights(z, epsilon=EVSOFTMAX_EPSILON)
        return z

    def soft_target_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-row loss against target distributions q of shape (..., V)."""
        vocab = logits.shape[-1]
        z = upcast(logits.reshape(-1, vocab))
        q = target.reshape(-1, vocab).to(z.dtype)
        if self.label_smoothing > 0:
            q = q * (1 - self.label_smoothing) + self.label_smoothing / vocab
        return self.target_distribution_loss(z, q)

    def target_distribution_loss(self, z: Tensor, q: Tensor) -> Tensor:
        """Per-row loss of logits z (rows, V) against (already smoothed) distributions q."""
        normalizer, mapping = self.normalizer, self.normalizer.mapping
        if mapping in _FY_ALPHA:
            return _FenchelYoung.apply(normalizer.transform(z), q, _FY_ALPHA[mapping])
        if mapping == "entmax_alpha":
            return fenchel_young_entmax_alpha(z, q, normalizer.effective_alpha(z))
        if isinstance(normalizer, SoftmaxSink):
            return -(q * normalizer.log_probs(z)).sum(-1)
        return -(q * torch.log_softmax(self.training_logits(z), dim=-1)).sum(-1)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(
                    f"soft targets must have the logits' shape {tuple(logits.shape)}, "
                    f"got {tuple(target.shape)}; pass integer class indices otherwise"
                )
            loss = self.soft_target_loss(logits, target)
            if self.reduction == "none":
                return loss.reshape(target.shape[:-1])
            return _reduce(loss, torch.ones_like(loss, dtype=torch.bool), self.reduction)
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)
        t = target.reshape(-1)
        valid = t != self.ignore_index
        mapping = self.normalizer.mapping
        if mapping in _FY_ALPHA or mapping in _DISTRIBUTION_LOSSES:
            z = upcast(z)
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            q = F.one_hot(safe_t, vocab).to(z.dtype)
            if self.label_smoothing > 0:
                q = q * (1 - self.label_smoothing) + self.label_smoothing / vocab
            loss = self.target_distribution_loss(z, q)
            loss = torch.where(valid, loss, torch.zeros_like(loss))
        elif self.uses_chunked(z):
            loss = sigma_cross_entropy(
                z, t, self.normalizer, self.label_smoothing, self.ignore_index
            )
        else:
            loss = F.cross_entropy(
                self.training_logits(z),
                t,
                ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing,
                reduction="none",
            )
        if self.reduction == "none":
            return loss.reshape(target.shape)
        return _reduce(loss, valid, self.reduction)


def build_loss(
    normalizer: Normalizer | str | None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    **normalizer_options,
) -> NormalizerLoss:
    """The right training loss for an output layer using ``normalizer``.

    Pass the output layer's own normaliser module (so a learned σ or temperature is shared
    with the model), or a registry name to build a fresh one.
    """
    if not isinstance(normalizer, Normalizer):
        normalizer = build_normalizer(normalizer, **normalizer_options)
    return NormalizerLoss(normalizer, label_smoothing, ignore_index, reduction)


__all__ = ["NormalizerLoss", "build_loss", "fenchel_young_entmax_alpha"]

"""The row formulas of σ + cross-entropy that both chunked kernels share (the chunked loss
over given logits, and the fused output layer that never materialises them):

    h = σ(z),  loss = logsumexp(h) − (1 − ε)·h_t − (ε / V)·Σ_j h_j,   ∂loss/∂h = softmax(h) − q

Helpers only: they import no kernel module.
"""

from __future__ import annotations

import torch


def sigma_ce_terms(sigma, x, target, smoothing, params):
    """Per row of logits x (C, V), already in float32 or float64: h = σ(x), the log-sum-exp
    of h as (m, log s), h_t = σ(x_t) and the smoothed loss, each (C, 1) but h."""
    h = sigma.forward(x, *params)
    m = h.amax(-1, keepdim=True)
    log_s = torch.log(torch.exp(h - m).sum(-1, keepdim=True))
    # σ of the gathered logit, not a gather of σ: a gather from a fused σ defeats
    # vectorisation in the compiled kernel (several times slower on the CPU).
    h_t = sigma.forward(x.gather(-1, target.unsqueeze(-1)), *params)
    loss = (m - (1.0 - smoothing) * h_t - smoothing * h.mean(-1, keepdim=True)) + log_s
    return h, m, log_s, h_t, loss


def softmax_minus_target(h, m, log_s, target, smoothing):
    """p − q, p = softmax(h) from its log-sum-exp (m, log s), q = (1 − ε)·onehot(t) + ε/V.

    In one expression: at a confident target p_t − 1 is exact in floating point (Sterbenz),
    where adding the two parts computed apart cancels catastrophically. The one-hot is a
    comparison with the column index, not a gather or scatter, so the compiled loop stays
    vectorised."""
    vocab = h.shape[-1]
    is_target = torch.arange(vocab, device=h.device) == target.unsqueeze(-1)
    q = torch.where(is_target, 1.0 - smoothing + smoothing / vocab, smoothing / vocab)
    return torch.exp((h - m) - log_s) - q

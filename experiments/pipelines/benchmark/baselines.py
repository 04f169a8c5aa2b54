"""What a user would otherwise run, measured beside the library: the authors' form of
MultiMax attention (σ op by op, as the paper writes it, eager and through TorchScript),
eager softmax attention, the standard output layer (``linear`` → σ → ``cross_entropy``),
and :class:`StandInLM`, a small causal decoder for the training-step comparison."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import multimax


def authors_sigma(x: Tensor, b: Tensor, d: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """σ(x) = x + Σ_k a_k·clamp(b_k − x, 0)^k + c_k·clamp(x − d_k, 0)^k, one op at a time."""
    out = x
    for k in range(b.shape[0]):
        out = out + a[k] * torch.clamp(b[k] - x, min=0) ** (k + 1)
        out = out + c[k] * torch.clamp(x - d[k], min=0) ** (k + 1)
    return out


@functools.cache
def scripted_sigma() -> Callable:
    """:func:`authors_sigma` through ``torch.jit.script``, scripted once."""
    with warnings.catch_warnings():  # torch.jit.script is deprecated, but it is the anchor
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(authors_sigma)


def authors_attention(sigma_fn: Callable, normalizer) -> Callable:
    lt, ht, lc, hc = normalizer.sigma_parameters()

    def run(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
        scores = sigma_fn(torch.matmul(q, k.transpose(-2, -1)) * scale, lt, ht, lc, hc)
        if causal:
            n, m = scores.shape[-2:]
            keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.matmul(torch.softmax(scores, -1), v)

    return run


def eager_softmax_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        n, m = scores.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v)


def standard_output_loss(mm, smoothing: float):
    """What one writes without this library: ``linear`` → σ op by op → ``cross_entropy``."""

    def loss(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        z = F.linear(x, weight).float()
        return F.cross_entropy(mm.modulate(z), target, label_smoothing=smoothing)

    return loss


class StandInLM(nn.Module):
    """A small causal decoder over :func:`multimax.attention` (pre-norm blocks), standing in
    for fairseq's transformer_lm in the step-time comparison. ``forward`` returns the
    features; ``loss`` applies the output layer as the fairseq criterion does (σ + cross-
    entropy from the features, no logits, for MultiMax; linear + cross-entropy for softmax)."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, tokens: int, name: str):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "ln2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(
                        nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
                    ),
                }
            )
            block.normalizer = multimax.build_normalizer(name)
            self.blocks.append(block)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.output_normalizer = multimax.build_normalizer(name)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n = tokens.shape
        x = self.embed(tokens) + self.pos[:n]
        for block in self.blocks:
            qkv = block["qkv"](block["ln1"](x)).reshape(b, n, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            a = multimax.attention(q, k, v, block.normalizer, is_causal=True)
            x = x + block["proj"](a.transpose(1, 2).reshape(b, n, -1))
            x = x + block["mlp"](block["ln2"](x))
        return self.ln(x)

    def loss(self, features: Tensor, target: Tensor) -> Tensor:
        if self.output_normalizer.is_plain_softmax:
            return F.cross_entropy(self.head(features).flatten(0, -2), target.flatten())
        return multimax.linear_sigma_cross_entropy(
            features, self.head.weight, target, self.output_normalizer
        )[0]

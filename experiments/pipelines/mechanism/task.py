"""A retrieval task whose correct attention is known, and a one-layer attention model for it.

Each example holds N items; item i has a class c_i (of C) and a value v_i ~ N(0, s²). The
query names a class q, and exactly m items carry it (the *relevant* items); the other N − m
(distractors) carry one of the other classes. The target is the mean of the relevant values,

    y = (1/m) Σ_{i: c_i = q} v_i,

so the ideal attention row puts 1/m on every relevant item (m modes, all kept) and exactly 0
on every distractor (residual mass 0). Items show their class as a one-hot vector plus
Gaussian noise of std ``key_noise``, so learned scores of relevant items scatter: a
normaliser must keep several close-but-unequal high scores together while silencing many
low ones. That is the paper's "sparse and multi-modal at once" in its plainest form.

The model is one cross-attention layer (the query attends to the items) through
:func:`multimax.attention`; every number :func:`evaluate` reports is read from the weights
that layer actually used (:func:`multimax.record_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import multimax
from multimax import metrics
from multimax.normalizers import Normalizer, PerHeadNormalizer

# --- the task ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalTask:
    """Sizes and noise of the task (``cfg.data``)."""

    num_items: int  # N
    num_relevant: int  # m
    num_classes: int = 16  # C
    key_noise: float = 0.25
    value_std: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_relevant <= self.num_items:
            raise ValueError(
                f"need 1 <= num_relevant (m={self.num_relevant}) <= num_items (N={self.num_items})"
            )
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (one query class + distractors), got {self.num_classes}"
            )

    @property
    def item_features(self) -> int:
        """Per item: C class channels (one-hot + noise) and one value channel."""
        return self.num_classes + 1

    @property
    def target_variance(self) -> float:
        """Var(y) = s² / m: the error of always predicting 0, used to normalise the MSE."""
        return self.value_std**2 / self.num_relevant


@dataclass
class RetrievalBatch:
    query: Tensor  # (B, C) one-hot query class
    items: Tensor  # (B, N, C + 1): noisy one-hot class, then the value
    relevant: Tensor  # (B, N) bool, True where the item's class is the query's
    target: Tensor  # (B,) mean value of the relevant items

    def __len__(self) -> int:
        return self.query.shape[0]

    def slice(self, start: int, stop: int) -> RetrievalBatch:
        return RetrievalBatch(
            self.query[start:stop],
            self.items[start:stop],
            self.relevant[start:stop],
            self.target[start:stop],
        )


def sample_batch(
    task: RetrievalTask, batch_size: int, generator: torch.Generator
) -> RetrievalBatch:
    """``batch_size`` independent examples; all randomness comes from ``generator``."""
    b, n, m, c = batch_size, task.num_items, task.num_relevant, task.num_classes
    query_class = torch.randint(0, c, (b,), generator=generator)
    # Relevant positions: the first m of a random permutation of the N slots.
    order = torch.rand(b, n, generator=generator).argsort(dim=-1)
    relevant = torch.zeros(b, n, dtype=torch.bool)
    relevant.scatter_(1, order[:, :m], True)
    # Distractor classes: uniform over the C - 1 classes that are not the query's.
    offset = torch.randint(1, c, (b, n), generator=generator)
    item_class = torch.where(relevant, query_class[:, None], (query_class[:, None] + offset) % c)
    keys = nn.functional.one_hot(item_class, c).float()
    keys = keys + task.key_noise * torch.randn(b, n, c, generator=generator)
    values = task.value_std * torch.randn(b, n, generator=generator)
    target = (values * relevant).sum(-1) / m
    items = torch.cat([keys, values[..., None]], dim=-1)
    query = nn.functional.one_hot(query_class, c).float()
    return RetrievalBatch(query, items, relevant, target)


# --- the model --------------------------------------------------------------------------


class RetrievalAttention(nn.Module):
    """y_hat = w · Σ_i p_i W_v x_i + b, with p = normalizer(q·k_i / √d) over the N items.

    q = W_q e_query, k_i = W_k x_i: one cross-attention layer with ``heads`` heads of
    ``dim / heads`` channels; the attention runs through :func:`multimax.attention`.
    """

    def __init__(self, task: RetrievalTask, normalizer: Normalizer, dim: int = 32, heads: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim ({dim}) must be divisible by model.heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(task.num_classes, dim, bias=False)
        self.k_proj = nn.Linear(task.item_features, dim, bias=False)
        self.v_proj = nn.Linear(task.item_features, dim)
        self.head = nn.Linear(dim, 1)
        self.normalizer = normalizer

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, D)

    def project(self, query: Tensor, items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, k, v) as (B, H, 1, D), (B, H, N, D), (B, H, N, D)."""
        q = self._split(self.q_proj(query)[:, None, :])
        return q, self._split(self.k_proj(items)), self._split(self.v_proj(items))

    def scores(self, query: Tensor, items: Tensor) -> Tensor:
        """The scaled scores q·k_i/√d (B, H, N) the normaliser sees (diagnostics only)."""
        q, k, _ = self.project(query, items)
        return (q @ k.transpose(-2, -1)).squeeze(-2) * self.scale

    def forward(self, query: Tensor, items: Tensor) -> Tensor:
        q, k, v = self.project(query, items)
        # The query stands after the N items: a causal-only normaliser (stick-breaking) sees all
        # of them, the nearest breaking the stick first; the others ignore the order.
        causal = self.normalizer.causal_only
        out = multimax.attention(q, k, v, self.normalizer, scale=self.scale, is_causal=causal)
        out = out.transpose(1, 2).reshape(query.shape[0], -1)
        return self.head(out).squeeze(-1)


# --- what is measured -------------------------------------------------------------------


def relevant_mass(p: Tensor, relevant: Tensor) -> Tensor:
    """Σ_{i relevant} p_i per row: 1 for the ideal attention."""
    return (p * relevant).sum(-1)


def residual_mass(p: Tensor, relevant: Tensor) -> Tensor:
    """Σ_{i distractor} p_i per row: the mass that leaks to the noise (0 is ideal)."""
    return (p * ~relevant).sum(-1)


def modes_kept(p: Tensor, relevant: Tensor, rel_threshold: float = 0.5) -> Tensor:
    """Share of the relevant items holding >= ``rel_threshold`` × the largest relevant weight
    (1 is ideal: every relevant item is a mode; 1/m: collapsed onto one)."""
    m = relevant.sum(-1).clamp_min(1)
    return metrics.num_modes(p, rel_threshold, mask=relevant) / m


def min_max_ratio(p: Tensor, relevant: Tensor) -> Tensor:
    """Smallest over largest relevant weight per row (1: all equal; 0: one left out)."""
    low = p.masked_fill(~relevant, float("inf")).amin(-1)
    high = p.masked_fill(~relevant, 0.0).amax(-1)
    return torch.where(high > 0, low / high.clamp_min(torch.finfo(p.dtype).tiny), 0.0)


@torch.no_grad()
def evaluate(
    model: RetrievalAttention,
    task: RetrievalTask,
    data: RetrievalBatch,
    rel_threshold: float = 0.5,
    batch_size: int = 512,
) -> tuple[dict[str, float], Tensor]:
    """Held-out metrics from the model's own attention weights, and those weights (B, H, N).

    Metrics (means over examples and heads): ``task_error`` = MSE / Var(y) (0 perfect, 1 =
    predicting 0), ``relevant_mass``, ``residual_mass``, ``modes_kept``, ``min_max_ratio``,
    ``distractor_zeros`` (share of distractors with exactly zero weight), and the row
    statistics of :func:`multimax.metrics.attention_statistics` (``num_modes`` over the whole
    row, ``entropy``, ...).
    """
    was_training = model.training
    model.eval()
    predictions, rows = [], []
    for start in range(0, len(data), batch_size):
        chunk = data.slice(start, start + batch_size)
        with multimax.record_attention() as recorded:
            predictions.append(model(chunk.query, chunk.items))
        if len(recorded) != 1:
            raise RuntimeError(f"expected one attention call per forward, got {len(recorded)}")
        rows.append(recorded[0].squeeze(-2))  # (B, H, N)
    model.train(was_training)
    prediction, p = torch.cat(predictions), torch.cat(rows).float()
    relevant = data.relevant[:, None, :].expand_as(p)
    mse = float(((prediction - data.target) ** 2).mean())
    row_stats = metrics.attention_statistics(p, rel_threshold=rel_threshold)
    result = {
        "task_error": mse / task.target_variance,
        "mse": mse,
        "relevant_mass": float(relevant_mass(p, relevant).mean()),
        "residual_mass": float(residual_mass(p, relevant).mean()),
        "modes_kept": float(modes_kept(p, relevant, rel_threshold).mean()),
        "min_max_ratio": float(min_max_ratio(p, relevant).mean()),
        "distractor_zeros": float(metrics.share_zeros(p, mask=~relevant).mean()),
        **{k: v for k, v in row_stats.items() if k != "share_zeros"},
    }
    return result, p


def normalizer_parameters(normalizer: Normalizer) -> dict[str, list[float] | float]:
    """The learned scalars of a normaliser (σ's b, d, a, c; a learned temperature; SSMax's
    scale, the sink logit, entmax's α, one per head)."""
    out: dict[str, list[float] | float] = {}
    if isinstance(normalizer, PerHeadNormalizer):
        for name, param in normalizer.named_parameters():
            out[name] = [float(x) for x in param.detach()]
    if isinstance(normalizer, multimax.MultiMax):
        for name in ("low_threshold", "high_threshold", "low_coef", "high_coef"):
            out[name] = [float(x) for x in getattr(normalizer, name).detach()]
    temperature = getattr(normalizer, "temperature", None)
    if isinstance(normalizer, multimax.Softmax) and normalizer.learn_temperature:
        out["temperature"] = float(temperature.detach())
    return out


def ideal_model(
    task: RetrievalTask, normalizer: Normalizer, gap: float = 200.0
) -> RetrievalAttention:
    """The model with hand-set weights whose scores are ``gap`` on relevant items and 0 on
    distractors (for noise-free keys), and whose output is exactly the mean of the attended
    values: the ideal attention, for tests and as a reference. Needs dim >= num_classes."""
    dim = max(task.num_classes, 2)
    model = RetrievalAttention(task, normalizer, dim=dim, heads=1)
    c = task.num_classes
    with torch.no_grad():
        for layer in (model.q_proj, model.k_proj, model.v_proj, model.head):
            layer.weight.zero_()
        model.q_proj.weight[:c, :c] = torch.eye(c) * gap / model.scale
        model.k_proj.weight[:c, :c] = torch.eye(c)
        model.v_proj.weight[0, c] = 1.0  # channel 0 carries the value
        model.v_proj.bias.zero_()
        model.head.weight[0, 0] = 1.0
        model.head.bias.zero_()
    return model

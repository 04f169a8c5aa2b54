"""The mechanism study's model, composed from the real config tree: every study normaliser
builds and trains, the measurements read the model's real attention weights, and ideal
attention scores give zero residual mass and every mode."""

from __future__ import annotations

import math

import pytest
import torch

import multimax
from experiments.core.setup import normalizer_label, normalizer_options
from experiments.pipelines.mechanism.task import (
    RetrievalAttention,
    RetrievalTask,
    evaluate,
    ideal_model,
    modes_kept,
    sample_batch,
)
from tests.composition import compose

STUDY_NORMALIZERS = [
    ["normalizer=softmax"],
    ["normalizer=softmax_learned_temp"],
    ["normalizer=sparsemax"],
    ["normalizer=entmax15"],
    ["normalizer=evsoftmax"],
    ["normalizer=multimax", "normalizer.order=1"],
    ["normalizer=multimax", "normalizer.order=2"],
    ["normalizer=sigmoid"],
    ["normalizer=softpick"],
    ["normalizer=ssmax"],
    ["normalizer=softmax_sink"],
    ["normalizer=entmax_alpha"],
    ["normalizer=stickbreaking"],
]
# Ideal scores give 1/m on each relevant item only where the rows are (close to) distributions
# with equal weights for equal scores: not sigmoid (each weight ~1), not stick-breaking.
IDEAL_UNIFORM = [
    o for o in STUDY_NORMALIZERS if o[0] not in ("normalizer=sigmoid", "normalizer=stickbreaking")
]


def compose_cfg(overrides: list[str]):
    return compose("mechanism", overrides)


def build(overrides: list[str], task: RetrievalTask) -> RetrievalAttention:
    cfg = compose_cfg(overrides)
    name, options = normalizer_options(cfg, "attention")
    return RetrievalAttention(task, multimax.build_normalizer(name, **options), 16, 1)


@pytest.mark.parametrize(
    "overrides", [STUDY_NORMALIZERS[0], STUDY_NORMALIZERS[3], STUDY_NORMALIZERS[6]]
)
def test_metrics_read_the_models_real_attention_weights(overrides: list[str]) -> None:
    task = RetrievalTask(num_items=24, num_relevant=2, num_classes=6)
    torch.manual_seed(0)
    model = build(overrides, task)
    if isinstance(model.normalizer, multimax.MultiMax):  # a σ far from the identity
        with torch.no_grad():
            for p in model.normalizer.sigma_parameters():
                p.uniform_(-1.0, 1.0)
    with torch.no_grad():
        model.q_proj.weight.mul_(8.0)  # peaked rows, so the metrics are not trivial
    data = sample_batch(task, 300, torch.Generator().manual_seed(3))
    result, rows = evaluate(model, task, data)

    # The weights, recomputed by hand from the model's parameters and normaliser.
    model.eval()
    with torch.no_grad():
        q, k, v = model.project(data.query, data.items)
        _, weights = multimax.attention_with_weights(q, k, v, model.normalizer, scale=model.scale)
        by_hand = model.normalizer(model.scores(data.query, data.items))
        # ... and they are the weights the model's output was computed from
        out = model.head((rows[:, :, None, :] @ v).transpose(1, 2).reshape(len(data), -1))
        prediction = model(data.query, data.items)
    torch.testing.assert_close(rows, weights.squeeze(-2))
    torch.testing.assert_close(rows, by_hand)
    torch.testing.assert_close(out.squeeze(-1), prediction)
    rel = data.relevant[:, None, :]
    assert result["residual_mass"] == pytest.approx(float(((rows * ~rel).sum(-1)).mean()), abs=1e-6)
    assert result["modes_kept"] == pytest.approx(
        float(modes_kept(rows, rel.expand_as(rows)).mean())
    )
    assert result["task_error"] == pytest.approx(
        float(((prediction - data.target) ** 2).mean()) / task.target_variance, rel=1e-5
    )
    assert 0 < result["residual_mass"] < 1 and result["modes_kept"] < 1


@pytest.mark.parametrize("overrides", IDEAL_UNIFORM, ids=lambda o: "_".join(o))
def test_ideal_attention_scores_give_zero_residual_and_every_mode(overrides: list[str]) -> None:
    task = RetrievalTask(num_items=48, num_relevant=3, num_classes=6, key_noise=0.0)
    cfg = compose_cfg(overrides)
    name, options = normalizer_options(cfg, "attention")
    model = ideal_model(task, multimax.build_normalizer(name, **options))
    data = sample_batch(task, 256, torch.Generator().manual_seed(4))
    result, rows = evaluate(model, task, data)
    assert result["residual_mass"] == 0.0
    assert result["distractor_zeros"] == 1.0
    assert result["modes_kept"] == 1.0
    assert result["num_modes"] == 3.0
    assert result["min_max_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert result["entropy"] == pytest.approx(math.log(3), abs=1e-5)
    assert result["task_error"] < 1e-10
    relevant_weights = rows[data.relevant[:, None, :].expand_as(rows)]
    torch.testing.assert_close(relevant_weights, torch.full_like(relevant_weights, 1 / 3))


def test_every_study_normalizer_composes_builds_and_trains() -> None:
    entries = [e.split() for e in compose("mechanism", []).study.normalizers]
    configs = [compose("mechanism", o) for o in entries]
    assert entries == STUDY_NORMALIZERS
    labels = []
    task = RetrievalTask(num_items=16, num_relevant=2)
    for cfg in configs:
        name, options = normalizer_options(cfg, "attention")
        labels.append(normalizer_label(name, options))
        model = RetrievalAttention(task, multimax.build_normalizer(name, **options), 16, 1)
        batch = sample_batch(task, 8, torch.Generator().manual_seed(0))
        loss = torch.nn.functional.mse_loss(model(batch.query, batch.items), batch.target)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert labels == [
        "softmax",
        "softmax(learn_temperature=True)",
        "sparsemax",
        "entmax15",
        "evsoftmax",
        "multimax(order=1)",
        "multimax",
        "sigmoid",
        "softpick",
        "ssmax",
        "softmax_sink",
        "entmax_alpha",
        "stickbreaking",
    ]

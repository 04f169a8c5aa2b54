"""The mechanism study: the task generator, the measurements, the ideal-attention fixture,
and a real (tiny) Hydra multirun that writes results.json and regenerates the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import multimax
from experiments.core.results import METRICS_LOG, read_results
from experiments.core.setup import normalizer_label, normalizer_options
from experiments.pipelines.mechanism.task import (
    RetrievalAttention,
    RetrievalTask,
    evaluate,
    ideal_model,
    min_max_ratio,
    modes_kept,
    residual_mass,
    sample_batch,
)

REPO = Path(__file__).resolve().parents[1]
STUDY_NORMALIZERS = [
    ["normalizer=softmax"],
    ["normalizer=softmax_learned_temp"],
    ["normalizer=sparsemax"],
    ["normalizer=entmax15"],
    ["normalizer=evsoftmax"],
    ["normalizer=multimax", "normalizer.order=1"],
    ["normalizer=multimax", "normalizer.order=2"],
]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("mechanism", overrides=overrides)


def build(overrides: list[str], task: RetrievalTask) -> RetrievalAttention:
    cfg = compose_cfg(overrides)
    name, options = normalizer_options(cfg, "attention")
    return RetrievalAttention(task, multimax.build_normalizer(name, **options), 16, 1)


# --- the generator --------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(16, 1), (64, 3), (100, 7)])
def test_generator_relevant_positions_are_the_query_class(n: int, m: int) -> None:
    task = RetrievalTask(num_items=n, num_relevant=m, num_classes=5, key_noise=0.0)
    batch = sample_batch(task, 200, torch.Generator().manual_seed(0))
    item_class = batch.items[..., : task.num_classes].argmax(-1)
    query_class = batch.query.argmax(-1)
    assert batch.relevant.dtype == torch.bool
    assert (batch.relevant.sum(-1) == m).all()
    assert torch.equal(batch.relevant, item_class == query_class[:, None])
    values = batch.items[..., -1]
    expected = torch.stack([values[i][batch.relevant[i]].mean() for i in range(len(batch))])
    torch.testing.assert_close(batch.target, expected)
    # relevant slots are spread over the whole row, not always the first m
    assert batch.relevant.float().mean(0).min() > 0


def test_generator_noise_and_reproducibility() -> None:
    task = RetrievalTask(num_items=64, num_relevant=2, num_classes=8, key_noise=0.3)
    a = sample_batch(task, 256, torch.Generator().manual_seed(1))
    b = sample_batch(task, 256, torch.Generator().manual_seed(1))
    c = sample_batch(task, 256, torch.Generator().manual_seed(2))
    assert torch.equal(a.items, b.items) and torch.equal(a.relevant, b.relevant)
    assert not torch.equal(a.items, c.items)
    # the generator's own classes: query class at relevant slots, noise std as configured
    cls = torch.where(a.relevant, a.query.argmax(-1)[:, None], -1)
    noise = a.items[..., :8][a.relevant] - torch.nn.functional.one_hot(cls[a.relevant], 8)
    assert abs(float(noise.std()) - 0.3) < 0.02
    with pytest.raises(ValueError, match="num_relevant"):
        RetrievalTask(num_items=4, num_relevant=5)


# --- the measurements -----------------------------------------------------------------------


def test_metric_functions_on_handmade_rows() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.9, 0.0, 0.1, 0.0]])
    rel = torch.tensor([[True, True, False, False], [True, True, False, False]])
    torch.testing.assert_close(residual_mass(p, rel), torch.tensor([0.2, 0.1]))
    torch.testing.assert_close(modes_kept(p, rel, 0.5), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(min_max_ratio(p, rel), torch.tensor([0.6, 0.0]))


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


@pytest.mark.parametrize("overrides", STUDY_NORMALIZERS, ids=lambda o: "_".join(o))
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
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        entries = [e.split() for e in compose("mechanism").study.normalizers]
        configs = [compose("mechanism", overrides=o) for o in entries]
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
    ]


# --- end to end -----------------------------------------------------------------------------


def test_tiny_multirun_writes_results_and_report(tmp_path: Path) -> None:
    """Two normalisers through the real Hydra app (-m), then the study report from them."""
    from experiments.pipelines.mechanism.study import report

    sweep = tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.mechanism",
            "-m",
            "experiment=mechanism_retrieval",
            "profile=smoke",
            "logger=none",
            "normalizer=softmax,multimax",
            "seed=0",
            "train.steps=20",
            "train.log_every=10",
            "eval.num_items=[16,32]",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    paths = sorted(sweep.rglob("results.json"))
    assert len(paths) == 2
    for path in paths:
        result = read_results(path)
        assert result.task == "mechanism" and result.metric_name == "task_error"
        assert result.profile == "smoke" and result.steps == 20
        assert result.normalizer in {"softmax", "multimax"}
        assert result.output_normalizer == "none"
        curve = (path.parent / METRICS_LOG).read_text().splitlines()
        assert json.loads(curve[-1])["step"] == 20  # the training curve reaches the last step
        assert math.isfinite(result.metric_value)
        assert (
            result.metric_value == result.metrics["task_error"] == result.metrics["N32/task_error"]
        )
        for n in (16, 32):
            assert 0.0 <= result.metrics[f"N{n}/residual_mass"] <= 1.0
            assert 0.0 < result.metrics[f"N{n}/modes_kept"] <= 1.0
        inspect = json.loads(path.with_name("inspect.json").read_text())
        assert len(inspect["attention"][0][0]) == 32
        if result.normalizer == "multimax":
            assert len(inspect["normalizer_parameters"]["high_coef"]) == 2

    out = tmp_path / "report"
    report(sweep, out)
    for name in ("summary", "by_eval_n", "multimax_vs_others"):
        assert (out / f"{name}.csv").exists() and "SMOKE" in (out / f"{name}.md").read_text()
    for name in ("error_residual_vs_n", "modes_kept_vs_m", "sigma_learned", "attention_rows"):
        assert (out / f"{name}.png").stat().st_size > 10_000
        assert (out / f"{name}.pdf").exists()
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2  # header + one row per normaliser (one m)
    assert all(row.split(",")[3] == "0" for row in summary[1:])  # seeds


def test_rerun_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.mechanism", "experiment=mechanism_retrieval",
               "profile=smoke", "logger=none", "normalizer=softmax", "train.steps=20",
               "train.log_every=10", f"hydra.run.dir={run_dir}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline"}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "holds a finished run" in again.stdout
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files

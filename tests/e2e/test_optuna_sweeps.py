"""Hydra's Optuna sweeper over the learning rate on the LM and MT smoke runs: every trial is
checked, each app's ``main`` returns its headline metric, and Optuna reports a best value
(``optimization_results.yaml`` in the sweep directory). Directions: docs/sweeps.md."""

from __future__ import annotations

import math

import pytest
import yaml

from tests.apps import TINY_LM, TINY_MT, run_app

SWEEPS = [
    ("language_model", TINY_LM, "minimize"),  # test perplexity
    ("translation", TINY_MT, "maximize"),  # BLEU
]


def optuna_sweep(app: str, tiny: list[str], direction: str, trials: int, tmp_path) -> dict:
    sweep = tmp_path / "sweep"
    proc = run_app(
        app,
        ["-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={trials}",
         f"hydra.sweeper.direction={direction}", "train.lr=tag(log, interval(0.001, 0.01))",
         *tiny, "train.max_update=4", f"data.root={tmp_path / 'data'}",
         f"hydra.sweep.dir={sweep}"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No trials are completed yet" not in proc.stderr
    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert found["name"] == "optuna" and math.isfinite(found["best_value"]), found
    assert 0.001 <= found["best_params"]["train.lr"] <= 0.01
    return found


# The default run keeps the language model's trial; translation's (a minute) runs under -m slow.
ONE_TRIAL = [SWEEPS[0], pytest.param(*SWEEPS[1], marks=pytest.mark.slow)]


@pytest.mark.parametrize(("app", "tiny", "direction"), ONE_TRIAL)
def test_one_optuna_trial_reports_the_apps_metric(app, tiny, direction, tmp_path):
    optuna_sweep(app, tiny, direction, 1, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("app", "tiny", "direction"), SWEEPS)
def test_an_optuna_sweep_of_two_trials_over_the_learning_rate(app, tiny, direction, tmp_path):
    optuna_sweep(app, tiny, direction, 2, tmp_path)

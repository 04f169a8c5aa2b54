"""The app schemas on plain dictionaries, the words that say what a type allows, and the few
jobs of a sweep that hold every swept value once."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import Field, ValidationError

from experiments.config.check import sweep_samples
from experiments.config.messages import describe
from experiments.config.schemas.base import Logger, Normalizer


@pytest.mark.parametrize(
    ("tp", "words"),
    [
        (Annotated[int, Field(ge=1)], "an integer >= 1"),
        (Annotated[float, Field(ge=0, lt=1)], "a number >= 0 and < 1"),
        (Annotated[int, Field(ge=1)] | Literal["auto"], "an integer >= 1 or auto"),
        (Annotated[float, Field(gt=0)] | None, "a number > 0 or null"),
        (Literal["fp32", "fp16"], "one of fp32, fp16"),
        (bool, "true or false"),
        (list[float], "a list (each a number)"),
    ],
)
def test_describe_says_what_a_type_allows(tp, words):
    assert describe(tp) == words


def test_a_section_refuses_unknown_keys_other_types_and_non_finite_numbers():
    Normalizer.model_validate({"name": "multimax", "order": 2})
    for bad in ({"name": "multimax", "order": "2"}, {"name": "multimax", "orders": 2},
                {"name": "softmax", "temperature": float("inf")}, {"name": "sparsmax"},
                {"name": "multimax", "order": True}):  # fmt: skip
        with pytest.raises(ValidationError):
            Normalizer.model_validate(bad)
    Logger.model_validate({"name": "wandb", "group": 123})  # a number may stand for a string


def test_a_sweep_is_checked_with_every_value_of_every_swept_key_once():
    samples = sweep_samples(["normalizer=softmax,multimax", "seed=0,1", "logger=none"])
    assert samples == [
        ["normalizer=softmax", "seed=0", "logger=none"],
        ["normalizer=multimax", "seed=0", "logger=none"],
        ["normalizer=softmax", "seed=1", "logger=none"],
    ]


def test_an_interval_is_checked_at_both_ends_and_config_params_count_too():
    samples = sweep_samples(
        ["+train.lrr=interval(0.0001,0.01)"], {"seed": "choice(0,1)", "train.lrr": "x"}
    )
    assert samples == [
        ["+train.lrr=0.0001", "seed=0"],
        ["+train.lrr=0.01", "seed=0"],
        ["+train.lrr=0.0001", "seed=1"],
    ]

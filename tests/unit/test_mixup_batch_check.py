"""Mixup / CutMix pair each image of a batch with another: an odd batch is refused by the
config check (naming the setting) before any work, not by timm's assertion mid-training."""

from __future__ import annotations

import pytest

from experiments.config.check import problems
from tests.composition import compose


def _problems(overrides: list[str]) -> list[str]:
    cfg = compose("vision", ["profile=smoke", *overrides], hydra=True)
    return problems(cfg, "vision", cfg.hydra.runtime.choices)


def test_an_odd_batch_with_mixup_is_refused_naming_the_setting():
    found = _problems(["trainer.batch_size=1", "augment.mixup=0.8"])
    assert len(found) == 1
    assert found[0].startswith("trainer.batch_size=1: Mixup / CutMix (augment.mixup=0.8")
    assert "use trainer.batch_size=2 or augment.mixup=0 augment.cutmix=0" in found[0]


@pytest.mark.parametrize(
    "overrides",
    [["trainer.batch_size=2", "augment.mixup=0.8"],
     ["trainer.batch_size=1", "augment.mixup=0", "augment.cutmix=0"]],
)  # fmt: skip
def test_an_even_batch_or_no_mixup_passes(overrides):
    assert _problems(overrides) == []

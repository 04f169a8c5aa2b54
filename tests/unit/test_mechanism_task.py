"""The mechanism study's task: the generator and the measurements on hand-made rows."""

from __future__ import annotations

import pytest
import torch

from experiments.pipelines.mechanism.task import (
    RetrievalTask,
    min_max_ratio,
    modes_kept,
    residual_mass,
    sample_batch,
)

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

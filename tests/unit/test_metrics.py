"""Diagnostics on hand-built distributions whose answers are known."""

import math

import pytest
import torch

from multimax import metrics


def test_on_known_rows():
    p = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],  # two equal modes, half exact zeros
            [0.7, 0.2, 0.1, 0.0],  # one dominant mode
            [0.25, 0.25, 0.25, 0.25],  # uniform
            [1.0, 0.0, 0.0, 0.0],  # one-hot
        ]
    )
    torch.testing.assert_close(metrics.share_zeros(p), torch.tensor([0.5, 0.25, 0.0, 0.75]))
    torch.testing.assert_close(
        metrics.share_below(p, threshold=0.15), torch.tensor([0.5, 0.5, 0.0, 0.75])
    )
    assert metrics.num_modes(p, rel_threshold=0.5).tolist() == [2, 1, 4, 1]
    assert metrics.num_modes(p, rel_threshold=0.1).tolist() == [2, 3, 4, 1]
    torch.testing.assert_close(metrics.second_mode_ratio(p), torch.tensor([1.0, 2 / 7, 1.0, 0.0]))
    h = metrics.entropy(p)
    torch.testing.assert_close(h[0], torch.tensor(math.log(2)))
    torch.testing.assert_close(h[2], torch.tensor(math.log(4)))
    assert h[3] == 0


def test_batched_shapes_and_masks():
    p = torch.rand(2, 3, 5, 6).softmax(-1)
    for fn in (
        metrics.share_below,
        metrics.share_zeros,
        metrics.num_modes,
        metrics.second_mode_ratio,
        metrics.entropy,
    ):
        assert fn(p).shape == (2, 3, 5)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False, False]])
    assert metrics.share_zeros(q, mask=valid).item() == 0.0  # padding is not sparsity
    assert metrics.share_zeros(q).item() == 0.5


def test_attention_statistics_skips_empty_rows_and_rejects_all_empty():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    stats = metrics.attention_statistics(p, threshold=0.1)
    assert stats["num_modes"] == 2 and stats["share_zeros"] == pytest.approx(1 / 3)
    assert stats["second_mode_ratio"] == 1.0
    with pytest.raises(ValueError, match="every row is empty"):
        metrics.attention_statistics(torch.zeros(2, 3))

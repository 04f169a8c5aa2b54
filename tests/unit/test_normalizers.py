"""The normaliser zoo's registry and each original normaliser's math (the contract every
normaliser keeps is tests/unit/test_normalizer_contract.py)."""

import entmax
import pytest
import torch

import multimax
from multimax import NORMALIZERS, build_normalizer


def test_registry_lists_the_five_names():
    assert {"softmax", "sparsemax", "entmax15", "evsoftmax", "multimax"} <= set(NORMALIZERS)
    assert "multimax_v2" in NORMALIZERS
    text = repr(NORMALIZERS)
    assert all(name in text for name in NORMALIZERS)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: softmax, sparsemax"):
        build_normalizer("softermax")


def test_unknown_option_names_accepted_ones():
    with pytest.raises(ValueError, match="order"):
        build_normalizer("multimax", temperature=2.0)


def test_none_is_plain_softmax():
    n = build_normalizer(None)
    assert isinstance(n, multimax.Softmax) and n.is_plain_softmax


def test_sparsemax_and_entmax15_match_the_entmax_package():
    torch.manual_seed(4)
    x = torch.randn(6, 20) * 2
    torch.testing.assert_close(build_normalizer("sparsemax")(x), entmax.sparsemax(x, dim=-1))
    torch.testing.assert_close(build_normalizer("entmax15")(x), entmax.entmax15(x, dim=-1))
    assert (build_normalizer("sparsemax")(x) == 0).any()  # really sparse


def test_softmax_temperature():
    x = torch.randn(4, 9)
    torch.testing.assert_close(
        build_normalizer("softmax", temperature=0.5)(x), torch.softmax(2 * x, -1)
    )
    learned = build_normalizer("softmax", learn_temperature=True, temperature=2.0)
    assert len(list(learned.parameters())) == 1
    torch.testing.assert_close(learned(x), torch.softmax(x / 2, -1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build_normalizer("softmax", temperature=0.0)


def test_evsoftmax_train_vs_eval():
    n = build_normalizer("evsoftmax")
    x = torch.tensor([[3.0, 2.5, -1.0, -2.0, 0.0]])  # mean 0.5: three entries below it
    below = x < x.mean()
    n.train()
    p_train = n(x)
    assert (p_train[below] > 0).all()
    ratio = p_train[0, 2] / p_train[0, 0]
    torch.testing.assert_close(ratio, 1e-6 * torch.exp(torch.tensor(-4.0)), rtol=1e-4, atol=0)
    n.eval()
    p_eval = n(x)
    assert (p_eval[below] == 0).all()
    expected = torch.softmax(x[~below], -1)
    torch.testing.assert_close(p_eval[~below], expected)


def test_evsoftmax_mean_ignores_masked_entries():
    n = build_normalizer("evsoftmax").eval()
    x = torch.tensor([[1.0, 0.0, -100.0]])
    keep = torch.tensor([[True, True, False]])
    p = n(x, mask=keep)  # mean over kept = 0.5 → only the first entry survives
    torch.testing.assert_close(p, torch.tensor([[1.0, 0.0, 0.0]]))


def test_bias_is_added_after_the_transform():
    m = build_normalizer("multimax", order=1)
    with torch.no_grad():
        m.low_threshold.fill_(0.0)
        m.low_coef.fill_(-2.0)
    x = torch.tensor([[1.0, -1.0, 0.5]])
    bias = torch.tensor([[0.0, 0.3, -0.2]])
    expected = torch.softmax(m.modulate(x) + bias, -1)
    torch.testing.assert_close(m(x, bias=bias), expected)

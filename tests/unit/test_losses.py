"""Output-layer losses: CE on σ(z), Fenchel-Young losses against entmax, finiteness."""

import entmax
import pytest
import torch
import torch.nn.functional as F

import multimax
from multimax import build_loss, build_normalizer


def test_softmax_loss_is_cross_entropy_with_label_smoothing():
    z, t = torch.randn(8, 11), torch.randint(0, 11, (8,))
    for ls in (0.0, 0.1):
        torch.testing.assert_close(
            build_loss("softmax", label_smoothing=ls)(z, t),
            F.cross_entropy(z, t, label_smoothing=ls),
        )


def test_multimax_loss_is_cross_entropy_on_sigma_of_logits():
    m = multimax.MultiMax(order=2)
    with torch.no_grad():
        m.low_coef.fill_(-0.5)
        m.high_coef.fill_(-0.3)
    z, t = torch.randn(6, 10) * 3, torch.randint(0, 10, (6,))
    loss = build_loss(m, label_smoothing=0.1)(z, t)
    torch.testing.assert_close(loss, F.cross_entropy(m.modulate(z), t, label_smoothing=0.1))
    loss.backward()
    assert m.low_coef.grad is not None and m.low_coef.grad.abs().sum() > 0  # shares the module


@pytest.mark.parametrize(
    ("name", "reference"), [("sparsemax", entmax.SparsemaxLoss), ("entmax15", entmax.Entmax15Loss)]
)
def test_sparse_losses_match_the_entmax_package(name, reference):
    torch.manual_seed(0)
    z = torch.randn(9, 13, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    ours = build_loss(name, reduction="none")(z, t)
    theirs = reference(reduction="none")(z, t)
    torch.testing.assert_close(ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), z)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), z)
    torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_fenchel_young_gradient_is_p_minus_q_with_smoothing(name):
    torch.manual_seed(1)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 7, (5,))
    loss = build_loss(name, label_smoothing=0.2, reduction="sum")(z, t)
    (grad,) = torch.autograd.grad(loss, z)
    q = F.one_hot(t, 7).double() * 0.8 + 0.2 / 7
    torch.testing.assert_close(grad, build_normalizer(name)(z.detach()) - q)
    assert (build_loss(name, reduction="none")(z, t) >= -1e-12).all()  # FY losses are >= 0


def test_evsoftmax_loss_stays_finite_even_for_targets_below_the_mean():
    z = torch.tensor([[10.0, 9.0, -50.0, -60.0]])
    t = torch.tensor([3])  # far below the row mean: zero probability at evaluation
    loss = build_loss("evsoftmax", label_smoothing=0.1)(z, t)
    assert torch.isfinite(loss) and loss > 10


def test_ignore_index_and_reductions():
    z, t = torch.randn(6, 5), torch.tensor([0, 1, -100, 3, -100, 4])
    for name in ("softmax", "sparsemax", "multimax"):
        normalizer = build_normalizer(name)
        per_token = build_loss(normalizer, reduction="none")(z, t)
        assert per_token.shape == (6,) and (per_token[t == -100] == 0).all()
        torch.testing.assert_close(build_loss(normalizer, reduction="sum")(z, t), per_token.sum())
        torch.testing.assert_close(build_loss(normalizer)(z, t), per_token.sum() / 4)


def test_sequence_shaped_inputs_and_half_precision():
    z, t = torch.randn(2, 3, 7).bfloat16(), torch.randint(0, 7, (2, 3))
    for name in ("softmax", "sparsemax", "entmax15", "evsoftmax", "multimax"):
        loss = build_loss(name)(z, t)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_label_smoothing_is_a_clear_error():
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("softmax", label_smoothing=1.0)


@pytest.mark.parametrize("name", ["softmax", "evsoftmax", "multimax", "sparsemax", "entmax15"])
def test_soft_targets_equal_integer_targets_with_label_smoothing(name):
    torch.manual_seed(2)
    normalizer = build_normalizer(name)
    z, t = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    loss = build_loss(normalizer, label_smoothing=0.1)
    torch.testing.assert_close(loss(z, F.one_hot(t, 7).float()), loss(z, t))
    per_row = build_loss(normalizer, reduction="none")(z, F.one_hot(t, 7).float())
    assert per_row.shape == (2, 3)


def test_soft_targets_of_the_wrong_shape_are_a_clear_error():
    with pytest.raises(ValueError, match="soft targets must have the logits' shape"):
        build_loss("softmax")(torch.randn(4, 5), torch.rand(4, 3))

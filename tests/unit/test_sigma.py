"""σ written once: every normaliser's transform is its registered σ's forward, and each
hand-written σ backward equals autograd through that forward (scores and parameters)."""

import pytest
import torch
from pointwise_normalizers import NORMALIZERS

from multimax import build_normalizer
from multimax.sigma import (
    IDENTITY_SIGMA,
    modulate,
    modulate_backward,
    multimax_sigma,
    pointwise_sigma,
)


def scores(seed=0, shape=(3, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()


@pytest.mark.parametrize("norm", list(NORMALIZERS))
def test_the_reference_transform_is_the_kernels_forward(norm):
    normalizer = NORMALIZERS[norm]()
    sigma = pointwise_sigma(normalizer)
    x = scores().detach().float()
    torch.testing.assert_close(sigma.forward(x, *sigma.params(normalizer)), normalizer.transform(x))


@pytest.mark.parametrize("norm", list(NORMALIZERS))
def test_the_hand_written_backward_equals_autograd_through_the_forward(norm):
    normalizer = NORMALIZERS[norm]().double()
    sigma = pointwise_sigma(normalizer)
    params = [p.detach().clone().requires_grad_() for p in sigma.params(normalizer)]
    x = scores()
    dh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    want = torch.autograd.grad((sigma.forward(x, *params) * dh).sum(), [x, *params])
    dx, d_params = sigma.backward(x.detach(), dh, *(p.detach() for p in params))
    torch.testing.assert_close(dx, want[0])
    torch.testing.assert_close(d_params, torch.cat([w.reshape(-1) for w in want[1:]]))


def test_first_order_steps_are_strict_as_autograd_has_them():
    """At x = b or x = d exactly, relu'(0) = 0: the slope there is the identity's."""
    params = [torch.tensor([0.5]), torch.tensor([1.5]), torch.tensor([-2.0]), torch.tensor([3.0])]
    x = torch.tensor([0.5, 1.5], dtype=torch.float32)
    dx, _ = modulate_backward(x, torch.ones_like(x), *params)
    assert dx.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_order_k_kernel_is_modulate(order):
    m = build_normalizer("multimax", order=order)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.linspace(-3, 3, 25)
    params = m.sigma_parameters()
    assert torch.equal(multimax_sigma(order).forward(x, *params), modulate(x, *params))


def test_plain_softmax_has_the_identity_and_sparse_mappings_have_none():
    assert pointwise_sigma(build_normalizer("softmax")) is IDENTITY_SIGMA
    for name in ("sparsemax", "entmax15", "evsoftmax"):
        assert pointwise_sigma(build_normalizer(name)) is None

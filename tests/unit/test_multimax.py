"""MultiMax: σ against the formula, the SoftMax limit, gradients, the interface names."""

import pytest
import torch

import multimax
from multimax import MultiMax, modulate


def set_params(m: MultiMax, b, d, a, c) -> MultiMax:
    with torch.no_grad():
        m.low_threshold.copy_(torch.tensor(b, dtype=torch.float32))
        m.high_threshold.copy_(torch.tensor(d, dtype=torch.float32))
        m.low_coef.copy_(torch.tensor(a, dtype=torch.float32))
        m.high_coef.copy_(torch.tensor(c, dtype=torch.float32))
    return m


def sigma_by_hand(x: float, b, d, a, c) -> float:
    out = x
    for k in range(len(b)):
        out += a[k] * max(b[k] - x, 0.0) ** (k + 1) + c[k] * max(x - d[k], 0.0) ** (k + 1)
    return out


def test_interface_names_and_shapes():
    m = MultiMax(order=2)
    for name in ("low_threshold", "high_threshold", "low_coef", "high_coef"):
        p = getattr(m, name)
        assert isinstance(p, torch.nn.Parameter) and p.shape == (2,)
    assert sum(p.numel() for p in m.parameters()) == 8
    assert MultiMax(order=1).low_coef.shape == (1,)
    assert MultiMax().order == 2


def test_init_is_truncated_normal_std_002():
    torch.manual_seed(0)
    values = torch.cat([torch.cat(MultiMax(order=2).sigma_parameters()) for _ in range(500)])
    assert values.abs().max() <= 0.04 + 1e-7  # truncated at two standard deviations
    assert 0.012 < values.std() < 0.02  # std of a N(0, 0.02) truncated at ±2σ is ~0.0176


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_modulate_matches_formula_with_hand_set_parameters(order):
    b, d = [-0.5, 0.3, 0.1, -0.2][:order], [1.0, 1.5, 0.5, 2.0][:order]
    a, c = [-2.0, 0.7, 0.2, -0.1][:order], [-0.5, 0.2, -0.1, 0.05][:order]
    m = set_params(MultiMax(order=order), b, d, a, c)
    xs = torch.linspace(-3, 3, 61)
    expected = torch.tensor([sigma_by_hand(float(x), b, d, a, c) for x in xs])
    torch.testing.assert_close(m.modulate(xs), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(modulate(xs, *m.sigma_parameters()), expected, atol=1e-5, rtol=1e-5)


def test_first_order_slopes():
    """t_b = 1 - a_1 below b, t_d = 1 + c_1 above d, identity in between."""
    m = set_params(MultiMax(order=1), [0.0], [1.0], [-2.0], [-0.5])
    x = torch.tensor([-2.0, -1.0, 0.25, 0.75, 2.0, 3.0])
    y = m.modulate(x)
    assert torch.isclose((y[1] - y[0]) / (x[1] - x[0]), torch.tensor(3.0))  # t_b = 3
    assert torch.isclose((y[3] - y[2]) / (x[3] - x[2]), torch.tensor(1.0))
    assert torch.isclose((y[5] - y[4]) / (x[5] - x[4]), torch.tensor(0.5))  # t_d = 0.5


def test_zero_parameters_give_softmax():
    m = set_params(MultiMax(order=2), [0, 0], [0, 0], [0, 0], [0, 0])
    x = torch.randn(7, 33)
    torch.testing.assert_close(m(x), torch.softmax(x, -1), atol=1e-7, rtol=0)


def test_functional_equals_module_and_dim_argument():
    m = MultiMax(order=2)
    x = torch.randn(4, 9, 5)
    p = m(x, dim=1)
    torch.testing.assert_close(p.sum(1), torch.ones(4, 5))
    torch.testing.assert_close(multimax.multimax(x, *m.sigma_parameters(), dim=1), p)


@pytest.mark.parametrize("order", [2, 3])
def test_gradcheck_inputs_and_parameters_float64(order):
    torch.manual_seed(1)
    values = ([-0.3, 0.1, 0.2], [0.4, 0.9, 0.3], [-1.0, 0.5, 0.2], [-0.4, 0.3, -0.1])
    m = set_params(MultiMax(order=order), *(v[:order] for v in values)).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in m.sigma_parameters()]
    assert torch.autograd.gradcheck(lambda x, *ps: multimax.multimax(x, *ps), (x, *params))


@pytest.mark.parametrize("order", [0, -1, 1.5, True, "2"])
def test_invalid_order_is_a_clear_error(order):
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        MultiMax(order=order)


def test_any_order_has_four_scalars_per_term():
    m = MultiMax(order=5)
    assert all(p.shape == (5,) for p in m.sigma_parameters())
    assert sum(p.numel() for p in m.parameters()) == 20


# --- MultiMax V2 -------------------------------------------------------------------------------


def test_v2_is_a_learned_affine_map_then_first_order_sigma():
    """MultiMaxV2(x) = softmax(σ₁(t·x + b)) , against the formula by hand."""
    m = multimax.build_normalizer("multimax_v2")
    assert isinstance(m, multimax.MultiMaxV2) and m.order == 1
    set_params(m, [-0.5], [1.0], [-2.0], [-0.5])
    with torch.no_grad():
        m.affine_scale.fill_(1.5)
        m.affine_shift.fill_(-0.25)
    xs = torch.linspace(-3, 3, 61)
    h = 1.5 * xs - 0.25
    expected = torch.tensor([sigma_by_hand(float(v), [-0.5], [1.0], [-2.0], [-0.5]) for v in h])
    torch.testing.assert_close(m.modulate(xs), expected, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 7)
    torch.testing.assert_close(m(x), torch.softmax(m.modulate(x), -1))


def test_v2_starts_from_identity_affine_map_and_has_six_scalars():
    torch.manual_seed(0)
    m = multimax.MultiMaxV2()
    assert m.affine_scale.item() == 1.0 and m.affine_shift.item() == 0.0
    assert sum(p.numel() for p in m.parameters()) == 6
    assert all(p.abs().max() <= 0.04 for p in m.sigma_parameters())  # MultiMax's init
    with torch.no_grad():
        m.affine_scale.fill_(3.0)
    m.reset_parameters()
    assert m.affine_scale.item() == 1.0


def test_v2_gradcheck_inputs_and_parameters_float64():
    torch.manual_seed(2)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    values = ([1.3], [-0.2], [-0.3], [0.4], [-1.0], [-0.4])
    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]

    def fn(x, *ps):
        return torch.softmax(multimax.modulate_v2(x, *ps), -1)

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_parameters_receive_gradients():
    m = MultiMax(order=2)
    x = torch.randn(5, 8) * 3
    (m(x)[:, 0].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())

"""The contract every normaliser of the zoo keeps, one parametrised suite for all of them.

``forward(x, mask=None, dim=-1)``: masked entries exactly 0; a row with every entry masked
gives zeros (and finite gradients), never NaN; half precision computed in float32 and
returned in its own dtype; ``dim`` moves the rows; gradients checked in float64 w.r.t. the
scores and the normaliser's own parameters. Normalisers whose rows are distributions sum
to one; the others (sigmoid, softpick, stick-breaking, the sink's weights) stay in [0, 1].
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from multimax import NORMALIZERS, build_normalizer

VARIANTS = [
    ("softmax", {}),
    ("softmax", {"temperature": 0.5}),
    ("softmax", {"learn_temperature": True, "temperature": 2.0}),
    ("sparsemax", {}),
    ("entmax15", {}),
    ("evsoftmax", {}),
    ("multimax", {"order": 1}),
    ("multimax", {"order": 2}),
    ("multimax", {"order": 3}),
    ("multimax", {"order": 5}),
    ("multimax_v2", {}),
    ("sigmoid", {}),
    ("sigmoid", {"logit_bias": -1.5}),
    ("softpick", {}),
    ("ssmax", {}),
    ("softmax_sink", {}),
    ("softmax_sink", {"learn_sink": False, "sink_init": 1.0}),
    ("entmax_alpha", {}),
    ("entmax_alpha", {"alpha_init": 1.2}),
    ("stickbreaking", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in VARIANTS]
# Rows of these sum to at most one (the rest of the mass goes nowhere); sigmoid's are free.
SUB_STOCHASTIC = {"softpick", "softmax_sink", "stickbreaking"}


def is_distribution(name: str) -> bool:
    return name not in SUB_STOCHASTIC and NORMALIZERS[name].output_refusal is None


def check_row_sums(name: str, p: torch.Tensor, atol: float = 1e-5) -> None:
    sums = p.sum(-1)
    if is_distribution(name):
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=atol, rtol=0)
    elif name in SUB_STOCHASTIC:
        assert (sums <= 1 + atol).all()
    assert (p >= 0).all() and (p <= 1 + atol).all()


def test_every_registered_normalizer_is_in_the_suite():
    assert set(NORMALIZERS) == {name for name, _ in VARIANTS}


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_masked_entries_are_exact_zero_and_empty_rows_are_zero(name, kw):
    torch.manual_seed(0)
    n = build_normalizer(name, **kw)
    x = torch.randn(4, 12) * 3
    mask = torch.rand(4, 12) > 0.4
    mask[0] = False  # an empty row
    mask[1, 3] = True
    p = n(x, mask=mask)
    assert torch.isfinite(p).all()
    assert (p[~mask] == 0).all()
    assert (p[0] == 0).all()
    check_row_sums(name, p[1:])


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_empty_rows_have_finite_gradients(name, kw):
    n = build_normalizer(name, **kw)
    x = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[False] * 5, [True, False, True, True, False]])
    n(x, mask=mask).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in n.parameters() if p.grad is not None)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_mask_equals_dropping_the_entries(name, kw):
    torch.manual_seed(1)
    n = build_normalizer(name, **kw).eval()
    x = torch.randn(10) * 2
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    p = n(x, mask=keep)
    torch.testing.assert_close(p[keep], n(x[keep]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(name, kw, dtype):
    torch.manual_seed(2)
    n = build_normalizer(name, **kw)
    x = torch.randn(3, 16) * 4
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[2] = False
    p = n(x.to(dtype), mask=mask)
    assert p.dtype == dtype
    assert torch.isfinite(p).all() and (p[2] == 0).all()
    reference = n(x.to(dtype).float(), mask=mask)
    torch.testing.assert_close(p.float(), reference, atol=1e-2, rtol=0)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_dim_argument(name, kw):
    n = build_normalizer(name, **kw).eval()
    x = torch.randn(2, 7, 3)
    mask = torch.rand(2, 7, 3) > 0.3
    torch.testing.assert_close(
        n(x, mask=mask, dim=1), n(x.transpose(1, 2), mask=mask.transpose(1, 2)).transpose(1, 2)
    )


def _move_from_defaults(name: str, n: torch.nn.Module) -> None:
    """Parameters away from their initial values, so that every piece is exercised."""
    with torch.no_grad():
        if name.startswith("multimax"):
            values = ([-0.4, 0.2, 0.1], [0.5, 0.8, 0.9], [-1.0, 0.3, 0.1], [-0.5, 0.2, 0.05])
            for p, v in zip(n.sigma_parameters(), values, strict=True):
                p.copy_(torch.tensor((v * 2)[: n.order], dtype=torch.float64))
            if name == "multimax_v2":
                n.affine_scale.fill_(1.3)
                n.affine_shift.fill_(-0.2)
        elif name == "ssmax":
            n.scale.fill_(0.8)
        elif name == "softmax_sink" and n.learn_sink:
            n.sink.fill_(0.7)
        elif name == "entmax_alpha":
            n.alpha.fill_(1.35)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_gradcheck_float64_inputs_and_parameters(name, kw):
    torch.manual_seed(3)
    n = build_normalizer(name, **kw).double().train()
    _move_from_defaults(name, n)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2:4] = False
    names = [k for k, _ in n.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(n, dict(zip(names, ps)), (x,), {"mask": mask})

    inputs = (x, *[p.detach().clone().requires_grad_() for p in n.parameters()])
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6)


finite_rows = arrays(
    "float32",
    st.tuples(st.integers(1, 4), st.integers(1, 12)),
    elements=st.floats(-30, 30, width=32),
)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(x=finite_rows)
def test_outputs_are_finite_and_in_range(name, kw, x):
    """Distributions lie on the simplex; the others in [0, 1] (sub-stochastic rows sum <= 1)."""
    n = build_normalizer(name, **kw)
    p = n(torch.from_numpy(x))
    assert torch.isfinite(p).all()
    check_row_sums(name, p)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
@pytest.mark.parametrize("mask", [False, True])
def test_rows_without_entries_give_an_empty_result_with_gradients(name, kw, mask):
    """Zero keys (a dimension of size 0 along ``dim``): an empty result, no error."""
    n = build_normalizer(name, **kw)
    x = torch.randn(3, 0, requires_grad=True)
    p = n(x, mask=torch.ones(3, 0, dtype=torch.bool) if mask else None)
    assert p.shape == (3, 0)
    p.sum().backward()
    assert x.grad.shape == (3, 0)

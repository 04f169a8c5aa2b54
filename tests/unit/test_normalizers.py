"""The normaliser zoo: one contract (masks, empty rows, dtypes, simplex), each one's math."""

import entmax
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

import multimax
from multimax import NORMALIZERS, build_normalizer

ALL = list(NORMALIZERS)
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
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in VARIANTS]


def test_registry_lists_the_five_names():
    assert {"softmax", "sparsemax", "entmax15", "evsoftmax", "multimax"} <= set(NORMALIZERS)
    assert "multimax_v2" in NORMALIZERS
    text = repr(NORMALIZERS)
    assert all(name in text for name in ALL)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: softmax, sparsemax"):
        build_normalizer("softermax")


def test_unknown_option_names_accepted_ones():
    with pytest.raises(ValueError, match="order"):
        build_normalizer("multimax", temperature=2.0)


def test_none_is_plain_softmax():
    n = build_normalizer(None)
    assert isinstance(n, multimax.Softmax) and n.is_plain_softmax


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
    torch.testing.assert_close(p[1:].sum(-1), torch.ones(3))


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
    torch.testing.assert_close(n(x, dim=1), n(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
def test_gradcheck_float64_inputs_and_parameters(name, kw):
    torch.manual_seed(3)
    n = build_normalizer(name, **kw).double().train()
    if name.startswith("multimax"):
        with torch.no_grad():  # away from the default ~0 so every σ piece is exercised
            values = ([-0.4, 0.2, 0.1], [0.5, 0.8, 0.9], [-1.0, 0.3, 0.1], [-0.5, 0.2, 0.05])
            for p, v in zip(n.sigma_parameters(), values, strict=True):
                p.copy_(torch.tensor((v * 2)[: n.order], dtype=torch.float64))
            if name == "multimax_v2":
                n.affine_scale.fill_(1.3)
                n.affine_shift.fill_(-0.2)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2:4] = False
    names = [k for k, _ in n.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(n, dict(zip(names, ps)), (x,), {"mask": mask})

    inputs = (x, *[p.detach().clone().requires_grad_() for p in n.parameters()])
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6)


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


finite_rows = arrays(
    "float32",
    st.tuples(st.integers(1, 4), st.integers(1, 12)),
    elements=st.floats(-30, 30, width=32),
)


@pytest.mark.parametrize(("name", "kw"), VARIANTS, ids=IDS)
@settings(max_examples=40, deadline=None)
@given(x=finite_rows)
def test_outputs_lie_on_the_simplex(name, kw, x):
    n = build_normalizer(name, **kw)
    p = n(torch.from_numpy(x))
    assert torch.isfinite(p).all()
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)


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

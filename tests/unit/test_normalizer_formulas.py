"""The 2024-2025 normalisers against their papers' formulas, written out naively here:
sigmoid attention, softpick, Scalable-Softmax, the sink logit, learned-α entmax, stick-breaking;
their per-head parameters, the key count n under masks, and the refusals."""

import math

import entmax
import pytest
import torch

import multimax
from multimax import build_normalizer
from multimax.normalizers import (
    check_output_normalizer,
    default_output_normalizer,
    kept_count,
    stickbreaking_masked,
)


def naive_stickbreaking(row: torch.Tensor) -> torch.Tensor:
    """w_j = β_j Π_{k>j} (1 − β_k) for one row, keys in position order (query last)."""
    beta = torch.sigmoid(row)
    out = torch.empty_like(row)
    for j in range(len(row)):
        out[j] = beta[j] * torch.prod(1 - beta[j + 1 :])
    return out


def test_sigmoid_is_sigmoid_of_x_minus_log_n_over_the_kept_keys():
    x = torch.randn(3, 8, dtype=torch.float64)
    keep = torch.rand(3, 8) > 0.3
    n = keep.sum(-1, keepdim=True).to(x.dtype)
    p = build_normalizer("sigmoid")(x, mask=keep)
    torch.testing.assert_close(p, torch.sigmoid(x - n.log()) * keep)
    fixed = build_normalizer("sigmoid", logit_bias=-2.0)(x)
    torch.testing.assert_close(fixed, torch.sigmoid(x - 2.0))


def test_softpick_matches_its_formula_and_survives_extreme_rows():
    x = torch.randn(4, 9, dtype=torch.float64) * 2
    e = torch.expm1(x)
    expected = torch.relu(e) / (e.abs().sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(build_normalizer("softpick")(x), expected)
    extreme = torch.tensor([[1000.0, 999.0, -5.0], [-1000.0, -900.0, -800.0]])
    p = build_normalizer("softpick")(extreme)
    assert torch.isfinite(p).all()
    assert (p[1] == 0).all()  # every score below zero: no mass at all
    torch.testing.assert_close(p[0, 0] / p[0, 1], torch.tensor(math.e), rtol=1e-4, atol=0)


def test_ssmax_is_softmax_of_s_log_n_x_with_n_the_kept_keys():
    ssmax = build_normalizer("ssmax")
    assert ssmax.scale.shape == (1,)
    torch.testing.assert_close(ssmax.scale, torch.tensor([0.43]))
    x = torch.randn(2, 10)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 6:] = False
    p = ssmax(x, mask=keep)
    torch.testing.assert_close(p[0], torch.softmax(0.43 * math.log(10) * x[0], -1))
    torch.testing.assert_close(p[1, :6], torch.softmax(0.43 * math.log(6) * x[1, :6], -1))
    one_key = ssmax(torch.randn(1, 1))  # log 1 = 0: all weight on the single key
    torch.testing.assert_close(one_key, torch.ones(1, 1))


def test_softmax_sink_formula_softmax_one_and_the_plain_softmax_limit():
    x = torch.randn(3, 6, dtype=torch.float64)
    sink = build_normalizer("softmax_sink").double()
    with torch.no_grad():
        sink.sink.fill_(0.5)
    expected = x.exp() / (math.exp(0.5) + x.exp().sum(-1, keepdim=True))
    torch.testing.assert_close(sink(x), expected)
    softmax_one = build_normalizer("softmax_sink", learn_sink=False).double()
    assert list(softmax_one.parameters()) == []
    torch.testing.assert_close(softmax_one(x), x.exp() / (1 + x.exp().sum(-1, keepdim=True)))
    with torch.no_grad():
        sink.sink.fill_(-60.0)
    torch.testing.assert_close(sink(x), torch.softmax(x, -1))
    torch.testing.assert_close(sink.log_probs(x), sink(x).log())


def test_entmax_alpha_is_entmax_bisect_and_spans_entmax15_to_sparsemax():
    x = torch.randn(5, 12, dtype=torch.float64) * 2
    n = build_normalizer("entmax_alpha").double()
    torch.testing.assert_close(n.alpha, torch.tensor([1.5], dtype=torch.float64))
    torch.testing.assert_close(n(x), entmax.entmax15(x, dim=-1), atol=1e-9, rtol=0)
    with torch.no_grad():
        n.alpha.fill_(2.0)
    torch.testing.assert_close(n(x), entmax.sparsemax(x, dim=-1), atol=1e-9, rtol=0)
    with torch.no_grad():
        n.alpha.fill_(7.0)  # held at 2
    torch.testing.assert_close(n(x), entmax.sparsemax(x, dim=-1), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match=r"alpha_init must be in \(1, 2\]"):
        build_normalizer("entmax_alpha", alpha_init=1.0)


def test_entmax_alpha_learns_alpha():
    n = build_normalizer("entmax_alpha")
    x = torch.randn(4, 10)
    (n(x) * torch.randn(4, 10)).sum().backward()
    assert n.alpha.grad is not None and n.alpha.grad.abs().item() > 0


def test_stickbreaking_nearest_key_breaks_first_and_masked_keys_break_nothing():
    x = torch.randn(3, 7, dtype=torch.float64)
    p = stickbreaking_masked(x)
    for row, expected in zip(p, x, strict=True):
        torch.testing.assert_close(row, naive_stickbreaking(expected))
    keep = torch.tensor([True, False, True, True, False, True, True])
    masked = stickbreaking_masked(x[0], keep)
    torch.testing.assert_close(masked[keep], naive_stickbreaking(x[0][keep]))
    big = torch.tensor([0.0, 0.0, 30.0])  # the nearest key takes (almost) the whole stick
    torch.testing.assert_close(stickbreaking_masked(big)[-1], torch.tensor(1.0))


def test_stickbreaking_in_causal_attention_and_its_refusal_elsewhere():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    out, weights = multimax.attention_with_weights(q, k, v, "stickbreaking", is_causal=True)
    scores = q @ k.transpose(-2, -1) / 2.0
    for i in range(5):
        torch.testing.assert_close(
            weights[0, 1, i, : i + 1], naive_stickbreaking(scores[0, 1, i, : i + 1])
        )
        assert (weights[0, 1, i, i + 1 :] == 0).all()
    torch.testing.assert_close(multimax.attention(q, k, v, "stickbreaking", is_causal=True), out)
    with pytest.raises(
        ValueError, match=r"^stickbreaking attention is causal only.*is_causal=True"
    ) as err:
        multimax.attention(q, k, v, "stickbreaking")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["sigmoid", "ssmax"])
def test_key_count_includes_the_causal_mask(name):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 4, 3, dtype=torch.float64) for _ in range(3))
    _, weights = multimax.attention_with_weights(q, k, v, name, is_causal=True)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(3))[0, 0]
    normalizer = build_normalizer(name).double()
    for i in range(4):
        torch.testing.assert_close(weights[0, 0, i, : i + 1], normalizer(scores[i, : i + 1]))


def test_kept_count():
    x = torch.zeros(2, 3, 5)
    assert kept_count(x).unique().tolist() == [5.0]
    mask = torch.ones(3, 5, dtype=torch.bool).tril()  # rows keep 1, 2, 3 keys
    assert kept_count(x, mask).squeeze(-1)[0].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("name", "attribute"), [("ssmax", "scale"), ("softmax_sink", "sink"), ("entmax_alpha", "alpha")]
)
def test_per_head_parameters_act_on_their_own_head(name, attribute):
    torch.manual_seed(2)
    heads = build_normalizer(name, num_heads=3).double()
    assert getattr(heads, attribute).shape == (3,)
    values = {"scale": [0.3, 0.9, 1.4], "sink": [-1.0, 0.0, 2.0], "alpha": [1.2, 1.5, 1.9]}[
        attribute
    ]
    with torch.no_grad():
        getattr(heads, attribute).copy_(torch.tensor(values, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    mask = torch.rand(2, 1, 4, 6) > 0.3
    p = heads(x, mask=mask)
    for h, value in enumerate(values):
        single = build_normalizer(name).double()
        with torch.no_grad():
            getattr(single, attribute).fill_(value)
        torch.testing.assert_close(p[:, h], single(x[:, h], mask=mask[:, 0]), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="has 3 heads but got scores of shape"):
        heads(torch.randn(2, 4, 4, 6))


def test_output_layer_refusals_are_one_line_and_say_why():
    for name, why in [
        ("sigmoid", "not a distribution"),
        ("softpick", "sum to less than one"),
        ("stickbreaking", "causal attention only"),
    ]:
        with pytest.raises(
            ValueError, match=f"model.output_normalizer={name} is refused: .*{why}"
        ) as err:
            check_output_normalizer(name)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="cannot be an output layer"):
            multimax.build_loss(name)
        assert default_output_normalizer(name) == "softmax"
    for name in ["ssmax", "softmax_sink", "entmax_alpha", "multimax"]:
        check_output_normalizer(name)
        assert default_output_normalizer(name) == name


@pytest.mark.parametrize("name", ["ssmax", "softmax_sink", "entmax_alpha"])
def test_gradcheck_per_head_parameters_under_a_causal_mask(name):
    torch.manual_seed(3)
    n = build_normalizer(name, num_heads=2).double()
    start = {"ssmax": [0.6, 1.1], "softmax_sink": [-0.5, 0.8], "entmax_alpha": [1.3, 1.7]}[name]
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool).tril(diagonal=1)
    (param_name,) = [k for k, _ in n.named_parameters()]

    def fn(x, param):
        return torch.func.functional_call(n, {param_name: param}, (x,), {"mask": mask})

    param = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, param), atol=1e-6)

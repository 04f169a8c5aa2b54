"""The fused output layer: σ + cross-entropy from the hidden states and the output
weight equals ``F.cross_entropy(σ(x·Wᵀ + b))`` in value and in the gradients of x, W, b and
σ's parameters (label smoothing, ignore_index, every reduction, chunking, compiled kernels,
half precision, second derivatives, no tokens), and never holds a (tokens, vocabulary)
tensor."""

import pytest
import torch
import torch.nn.functional as F
from pointwise_normalizers import NORMALIZERS

import multimax.output_layer
from experiments.pipelines.benchmark.timing import cpu_peak_bytes
from multimax import build_normalizer, linear_sigma_cross_entropy
from multimax.compile_policy import set_compile_policy


def data(tokens=(3, 7), dim=12, vocab=50, bias=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.8).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g)).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, vocab, tokens, generator=g)
    target.view(-1)[:2] = -100  # ignored positions
    return x, weight, b, target


def plain(x, weight, bias, target, normalizer, smoothing, reduction):
    """What one writes without the fused layer."""
    z = F.linear(x, weight, bias)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    loss = F.cross_entropy(
        normalizer.transform(z).flatten(0, -2),
        target.flatten(),
        label_smoothing=smoothing,
        reduction="none",
    ).reshape(target.shape)
    valid = target != -100
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    return loss


def with_grads(fn, leaves):
    for t in leaves:
        if t is not None:
            t.grad = None
    loss = fn()
    weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def assert_close_all(got, want, tol=1e-5):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    torch.testing.assert_close(loss_g, loss_w, atol=tol, rtol=tol)
    for a, b in zip(grads_g, grads_w, strict=True):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)


@pytest.mark.parametrize("norm", list(NORMALIZERS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_tokens", [None, 4])
def test_fused_output_layer_equals_linear_then_cross_entropy(
    norm, smoothing, reduction, chunk_tokens
):
    normalizer = NORMALIZERS[norm]()
    x, weight, bias, target = data()
    leaves = [x, weight, bias, *normalizer.parameters()]

    def fused():
        return linear_sigma_cross_entropy(
            x,
            weight,
            target,
            normalizer,
            bias,
            label_smoothing=smoothing,
            reduction=reduction,
            chunk_tokens=chunk_tokens,
        )[0]

    got = with_grads(fused, leaves)
    want = with_grads(
        lambda: plain(x, weight, bias, target, normalizer, smoothing, reduction), leaves
    )
    assert_close_all(got, want)


def test_nll_is_minus_log_p_of_the_target_and_zero_where_ignored():
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, bias, target = data()
    loss, nll = linear_sigma_cross_entropy(x, weight, target, normalizer, bias, label_smoothing=0.1)
    log_p = torch.log_softmax(normalizer.transform(F.linear(x, weight, bias)), -1)
    safe = target.clamp_min(0)
    want = -log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    want = torch.where(target == -100, torch.zeros_like(want), want)
    assert nll.shape == target.shape and not nll.requires_grad
    torch.testing.assert_close(nll, want.detach(), atol=1e-5, rtol=1e-5)


def test_without_a_bias_and_with_inputs_that_need_no_gradient():
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, _, target = data(bias=False)
    x = x.detach()  # a frozen encoder's features: only W and σ get gradients
    leaves = [weight, *normalizer.parameters()]
    got = with_grads(lambda: linear_sigma_cross_entropy(x, weight, target, normalizer)[0], leaves)
    want = with_grads(lambda: plain(x, weight, None, target, normalizer, 0.0, "mean"), leaves)
    assert_close_all(got, want)
    assert x.grad is None


def test_compiled_kernels_equal_the_plain_loss():
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, bias, target = data()
    leaves = [x, weight, bias, *normalizer.parameters()]
    previous = set_compile_policy("always")
    try:
        for reduction in ("sum", "none"):
            got = with_grads(
                lambda r=reduction: linear_sigma_cross_entropy(
                    x, weight, target, normalizer, bias, label_smoothing=0.1, reduction=r,
                    chunk_tokens=5,
                )[0],
                leaves,
            )  # fmt: skip
            want = with_grads(
                lambda r=reduction: plain(x, weight, bias, target, normalizer, 0.1, r), leaves
            )
            assert_close_all(got, want, tol=1e-4)
    finally:
        set_compile_policy(previous)


def _saved_sizes(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_no_tokens_by_vocabulary_tensor_is_kept_or_held(reduction, monkeypatch):
    """Nothing (T, V) is saved for backward, and forward + backward peak below one (T, V)
    float tensor (chunks of 16 tokens out of 512), where linear + cross_entropy holds several."""
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, bias, target = data(tokens=(512,), dim=16, vocab=2000)
    logits = 512 * 2000

    def fused():
        loss = linear_sigma_cross_entropy(
            x, weight, target, normalizer, bias, reduction=reduction, chunk_tokens=16
        )[0]
        loss.sum().backward()

    def standard():
        plain(x, weight, bias, target, normalizer, 0.0, reduction).sum().backward()

    assert max(_saved_sizes(fused)) < logits
    held = cpu_peak_bytes(fused)
    assert held < logits * 4 / 4 < 3 * logits * 4 < cpu_peak_bytes(standard)
    default = multimax.output_layer.chunk_bounds(4096, 267744, None)
    assert default[0] == (0, multimax.output_layer.MIN_CHUNK_TOKENS)  # big V: fewest tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_half_precision_is_as_accurate_as_linear_then_cross_entropy(dtype, reduction):
    """bf16 / fp16 hidden states and weight (confident targets, where p_t − 1 nearly
    cancels): the gradients of x, W and σ are no further from float64 (same inputs) than
    those of ``linear`` in ``dtype`` then ``cross_entropy(σ(z.float()))``."""
    normalizer = NORMALIZERS["multimax2"]()
    g = torch.Generator().manual_seed(3)
    tokens, dim, vocab = 64, 16, 256
    weight = torch.randn(vocab, dim, generator=g)
    target = torch.randint(0, vocab, (tokens,), generator=g)
    x = torch.randn(tokens, dim, generator=g) * 0.3 + weight[target] * 0.6  # confident
    x, weight = (t.to(dtype).requires_grad_() for t in (x, weight))
    leaves = [x, weight, *normalizer.parameters()]

    def fused():
        return linear_sigma_cross_entropy(
            x, weight, target, normalizer, reduction=reduction, chunk_tokens=16
        )[0]

    got = with_grads(fused, leaves)
    base = with_grads(lambda: plain(x, weight, None, target, normalizer, 0.0, reduction), leaves)
    exact_n = NORMALIZERS["multimax2"]().double()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    exact = with_grads(
        lambda: plain(x64, w64, None, target, exact_n, 0.0, reduction).double(),
        [x64, w64, *exact_n.parameters()],
    )
    assert got[0].dtype == torch.float32
    assert got[1][0].dtype == got[1][1].dtype == dtype
    for a, b, want in zip([got[0], *got[1]], [base[0], *base[1]], [exact[0], *exact[1]]):
        error = lambda t, want=want: (t.double() - want).abs().max().item()  # noqa: E731
        assert error(a) <= 1.5 * error(b) + torch.finfo(dtype).eps * want.abs().max().item()


def test_under_cpu_bf16_autocast_the_products_run_in_bf16():
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, bias, target = data()
    leaves = [x, weight, bias, *normalizer.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = with_grads(
            lambda: linear_sigma_cross_entropy(x, weight, target, normalizer, bias)[0], leaves
        )
    cast = [t.detach().bfloat16().requires_grad_() for t in (x, weight, bias)]
    want = with_grads(
        lambda: linear_sigma_cross_entropy(*cast[:2], target, normalizer, cast[2])[0],
        [*cast, *normalizer.parameters()],
    )
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1], want[1], strict=True):
        assert a.dtype == torch.float32  # autocast's cast is differentiable: fp32 leaves
        torch.testing.assert_close(a, b.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_derivatives_equal_the_plain_loss(reduction):
    normalizer = NORMALIZERS["multimax2"]().double()
    x, weight, bias, target = (t.detach().double().requires_grad_() if t.is_floating_point()
                               else t for t in data(tokens=(6,), dim=4, vocab=7))  # fmt: skip
    leaves = [x, weight, bias, *normalizer.parameters()]

    def second(fn):
        loss = fn()
        first = torch.autograd.grad((loss * torch.linspace(1, 2, loss.numel()).double()).sum(),
                                    leaves, create_graph=True)  # fmt: skip
        mix = sum((d * (i + 1)).sum() for i, d in enumerate(first))
        return torch.autograd.grad(mix, leaves)

    got = second(lambda: linear_sigma_cross_entropy(x, weight, target, normalizer, bias,
                                                    reduction=reduction)[0])  # fmt: skip
    want = second(lambda: plain(x, weight, bias, target, normalizer, 0.0, reduction))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients():
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, bias, target = data()
    loss = linear_sigma_cross_entropy(x, weight, target, normalizer, bias)[0]
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, weight, bias)]
    for t in (x, weight, bias):
        t.grad = None
    loss.backward()
    for a, t in zip(first, (x, weight, bias), strict=True):
        torch.testing.assert_close(t.grad, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_tokens_give_an_empty_or_zero_loss_with_zero_gradients(reduction):
    normalizer = NORMALIZERS["multimax2"]()
    x, weight, bias, target = data(tokens=(0,))
    loss, nll = linear_sigma_cross_entropy(x, weight, target, normalizer, bias, reduction=reduction)
    assert nll.shape == (0,)
    assert loss.shape == ((0,) if reduction == "none" else ())
    loss.sum().backward()
    for t in (x, weight, bias, *normalizer.parameters()):
        assert t.grad is not None and (t.grad == 0).all()


def test_refusals_name_the_problem():
    x, weight, bias, target = data()
    with pytest.raises(ValueError, match="not softmax of a point-wise σ"):
        linear_sigma_cross_entropy(x, weight, target, build_normalizer("sparsemax"))
    normalizer = NORMALIZERS["multimax2"]()
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_sigma_cross_entropy(x, weight, target, normalizer, reduction="avg")
    with pytest.raises(ValueError, match="hidden .* and target .* disagree"):
        linear_sigma_cross_entropy(x, weight, target[:, :3], normalizer)

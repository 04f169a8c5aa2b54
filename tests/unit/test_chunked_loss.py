"""Chunked σ + cross-entropy equals the plain loss (value, logits and σ-parameter gradients)
and keeps no (T, V) tensor besides the logits."""

import pytest
import torch
from pointwise_normalizers import NORMALIZERS

from multimax import build_normalizer
from multimax.chunked_loss import sigma_cross_entropy
from multimax.compile_policy import set_compile_policy
from multimax.losses import NormalizerLoss


def data(tokens=(3, 7), vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*tokens, vocab, generator=g) * 3).requires_grad_()
    target = torch.randint(0, vocab, tokens, generator=g)
    target.view(-1)[:2] = -100  # ignored positions
    return logits, target


def loss_and_grads(loss_fn, logits, target):
    params = list(loss_fn.normalizer.parameters())
    for t in (logits, *params):
        t.grad = None
    loss = loss_fn(logits, target)
    weights = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), [logits.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("norm", list(NORMALIZERS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_equals_plain_loss(norm, smoothing, reduction):
    normalizer = NORMALIZERS[norm]()
    logits, target = data()
    plain = NormalizerLoss(normalizer, smoothing, reduction=reduction, chunked=False)
    chunked = NormalizerLoss(normalizer, smoothing, reduction=reduction, chunked=True)
    ref = loss_and_grads(plain, logits, target)
    got = loss_and_grads(chunked, logits, target)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_chunk_size_does_not_change_the_result(chunk_rows):
    normalizer = NORMALIZERS["multimax2"]()
    logits, target = data(tokens=(21,), vocab=33)
    target[3] = -100
    full = sigma_cross_entropy(logits, target, normalizer, 0.1, chunk_rows=10_000)
    part = sigma_cross_entropy(logits, target, normalizer, 0.1, chunk_rows=chunk_rows)
    torch.testing.assert_close(part, full)
    assert part[3] == 0


def test_chunked_keeps_only_the_logits_at_full_size():
    normalizer = NORMALIZERS["multimax2"]()
    logits, target = data(tokens=(8,), vocab=64)
    full = logits.numel()

    def saved(fn):
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(s >= full for s in sizes.values())

    chunked = NormalizerLoss(normalizer, chunked=True)
    plain = NormalizerLoss(normalizer, chunked=False)
    assert saved(lambda: chunked(logits, target)) == 1  # the logits themselves
    assert saved(lambda: plain(logits, target)) > 3  # σ's intermediates, log-softmax, ...


def test_auto_uses_chunks_only_for_softmax_of_pointwise_sigma_with_compiled_kernels():
    logits, _ = data()
    multimax = NormalizerLoss(NORMALIZERS["multimax2"]())
    assert not multimax.uses_chunked(logits)  # small: no compile, plain loss
    previous = set_compile_policy("always")
    try:
        assert multimax.uses_chunked(logits)
        assert not NormalizerLoss(build_normalizer("softmax")).uses_chunked(logits)
        assert not NormalizerLoss(build_normalizer("sparsemax")).uses_chunked(logits)
        assert not NormalizerLoss(build_normalizer("evsoftmax")).uses_chunked(logits)
    finally:
        set_compile_policy(previous)
    with pytest.raises(ValueError, match="point-wise σ"):
        NormalizerLoss(build_normalizer("sparsemax"), chunked=True)


@pytest.mark.parametrize("norm", ["multimax2", "multimax_v2"])
def test_compiled_chunked_loss_equals_plain_loss(norm):
    normalizer = NORMALIZERS[norm]()
    logits, target = data(tokens=(5, 6), vocab=40)
    plain = NormalizerLoss(normalizer, 0.1, chunked=False)
    ref = loss_and_grads(plain, logits, target)
    for t in (logits, *normalizer.parameters()):
        t.grad = None
    loss = sigma_cross_entropy(logits, target, normalizer, 0.1, chunk_rows=7, compiled=True)
    loss = loss.sum() / (target != -100).sum()
    (loss * 0.5).backward()  # loss_and_grads weighs a scalar loss by 0.5
    torch.testing.assert_close(loss.detach(), ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip([logits.grad, *(p.grad for p in normalizer.parameters())], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", ["multimax", "multimax_order3", "multimax_v2"])
def test_half_precision_gradient_at_confident_targets(dtype, compiled, smoothing, name):
    """At a confident target p_t − 1 nearly cancels: the gradient must be as accurate as
    autograd through ``F.cross_entropy(σ(z.float()))`` rounded once to ``dtype``, against
    float64 (a regression once had a median relative error of ~1, most entries 0)."""
    import torch.nn.functional as F

    options = {"multimax": {"order": 2}, "multimax_order3": {"order": 3}}.get(name, {})
    normalizer = build_normalizer(name.removesuffix("_order3"), **options)
    g = torch.Generator().manual_seed(1)
    # A trained-looking order-2 σ (steeper above d, flatter below b); order 3 adds a gentle
    # cubic term ((z − d)³ reaches ~10³ here), V2 keeps the first order after h = 1.5·z.
    b, d, a, c = (torch.randn(2, generator=g) * 0.1 for _ in range(4))
    with torch.no_grad():
        if name == "multimax_v2":
            normalizer.affine_scale.fill_(1.5)
            b, d, a, c = (t[:1] for t in (b, d, a, c))
        elif name == "multimax_order3":
            b, d = (torch.cat([t, torch.zeros(1)]) for t in (b, d))
            a, c = (torch.cat([t, torch.full((1,), 1e-3)]) for t in (a, c))
        for param, value in zip(normalizer.sigma_parameters(), (b, d, a, c), strict=True):
            param.copy_(value)
    tokens, vocab = 256, 512
    target = torch.randint(0, vocab, (tokens,), generator=g)
    z = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * 2
    rows = torch.arange(tokens)
    z[rows, target] += torch.linspace(4, 16, tokens, dtype=torch.float64)
    z = z.to(dtype)

    def target_grad(fn, x):
        x = x.clone().requires_grad_()
        fn(x).sum().backward()
        return x.grad.double()[rows, target]

    def ref_loss(x):
        return F.cross_entropy(normalizer.modulate(x), target, label_smoothing=smoothing)

    exact = target_grad(lambda x: ref_loss(x) * tokens, z.double())
    with torch.no_grad():
        p_t = torch.softmax(normalizer.modulate(z.double()), -1)[rows, target]
    confident = p_t > 0.99
    assert confident.sum() > 100
    baseline = target_grad(lambda x: ref_loss(x.float()) * tokens, z)
    got = target_grad(
        lambda x: sigma_cross_entropy(x, target, normalizer, smoothing, chunk_rows=32,
                                      compiled=compiled),
        z,
    )  # fmt: skip

    def median_error(grad):
        return ((grad - exact).abs() / exact.abs())[confident].median().item()

    assert median_error(got) <= 1.5 * median_error(baseline) + 1e-4
    assert (got[confident] == 0).float().mean() <= (baseline[confident] == 0).float().mean() + 0.02


# --- second derivatives, autocast, inputs without tokens ---------------------------------------


@pytest.mark.parametrize("norm", ["multimax2", "multimax3", "multimax_v2", "softmax_learned"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_second_derivatives_of_the_chunked_loss_equal_the_plain_loss(norm, smoothing):
    """Hessian-vector products (create_graph=True, then differentiate again) through the
    chunked loss equal those of the plain loss, for the logits and σ's parameters."""
    normalizer = NORMALIZERS[norm]().double()
    logits, target = data(tokens=(4, 3), vocab=11)
    logits = logits.detach().double().requires_grad_()
    leaves = [logits, *normalizer.parameters()]

    def second(chunked):
        loss = NormalizerLoss(normalizer, smoothing, chunked=chunked)(logits, target)
        first = torch.autograd.grad(loss, leaves, create_graph=True)
        g = torch.Generator().manual_seed(2)
        mix = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype)).sum() for d in first)
        return [d.detach() for d in first] + list(torch.autograd.grad(mix, leaves))

    for got, want in zip(second(True), second(False), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_chunked_loss_passes_gradgradcheck():
    normalizer = NORMALIZERS["multimax2"]().double()
    logits, target = data(tokens=(5,), vocab=7)
    logits = logits.detach().double().requires_grad_()

    def fn(z):
        return sigma_cross_entropy(z, target, normalizer, 0.1, chunk_rows=2)

    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_chunked_loss_under_cpu_bf16_autocast_equals_the_plain_loss():
    """Logits from a linear layer under bf16 autocast (so bf16 logits): the chunked loss runs,
    and its value and gradients equal the plain loss's under the same autocast."""
    normalizer = NORMALIZERS["multimax2"]()
    g = torch.Generator().manual_seed(3)
    features = torch.randn(12, 16, generator=g)
    target = torch.randint(0, 40, (12,), generator=g)
    layer = torch.nn.Linear(16, 40)

    def run(chunked):
        for t in (*layer.parameters(), *normalizer.parameters()):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = layer(features)
            loss = NormalizerLoss(normalizer, 0.1, chunked=chunked)(logits, target)
        loss.backward()
        assert logits.dtype == torch.bfloat16
        return loss.detach(), [t.grad for t in (*layer.parameters(), *normalizer.parameters())]

    (got, got_grads), (want, want_grads) = run(True), run(False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2 * b.abs().max().item(), rtol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_batch_without_tokens_gives_an_empty_or_zero_loss_with_zero_gradients(reduction):
    normalizer = NORMALIZERS["multimax2"]()
    logits = torch.randn(0, 9, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long)
    for chunked in (True, False):
        loss = NormalizerLoss(normalizer, 0.1, reduction=reduction, chunked=chunked)(logits, target)
        assert loss.shape == ((0,) if reduction == "none" else ())
        loss.sum().backward()
        assert logits.grad.shape == (0, 9)
        assert all(p.grad is not None and (p.grad == 0).all() for p in normalizer.parameters())
        for p in (logits, *normalizer.parameters()):
            p.grad = None

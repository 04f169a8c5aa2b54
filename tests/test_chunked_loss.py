"""Chunked σ + cross-entropy equals the plain loss (value, logits and σ-parameter gradients)
and keeps no (T, V) tensor besides the logits."""

import pytest
import torch

from multimax import build_normalizer
from multimax.chunked_loss import sigma_cross_entropy
from multimax.fused import set_compile_policy
from multimax.losses import NormalizerLoss


def strong(name, **options):
    n = build_normalizer(name, **options)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in n.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return n


NORMALIZERS = {
    "multimax2": lambda: strong("multimax", order=2),
    "multimax1": lambda: strong("multimax", order=1),
    "softmax_T0.7": lambda: build_normalizer("softmax", temperature=0.7),
    "softmax_learned": lambda: strong("softmax", learn_temperature=True),
}


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


def test_compiled_chunked_loss_equals_plain_loss():
    normalizer = NORMALIZERS["multimax2"]()
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

"""The rows of each benchmark section, built from the config: attention at one shape
(training and inference), the output layer at one (tokens, vocabulary) case, and whole-model
training steps (timm's DeiT-small and :class:`StandInLM`), each MultiMax row beside the
SoftMax row it is compared with. An attention row ``NAME/IMPL`` with another registered
normaliser (``ssmax/auto``, ``sigmoid/auto``, ...) runs it at its initial values, with one
parameter per head where it has them, through path ``IMPL``."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

import multimax
from experiments.core.setup import normalizer_options
from experiments.pipelines.benchmark.baselines import (
    StandInLM,
    authors_attention,
    authors_sigma,
    eager_softmax_attention,
    scripted_sigma,
    standard_output_loss,
)
from experiments.pipelines.benchmark.timing import Row, available_bytes
from multimax.attention import ATTENTION_PATHS, AttentionInputs, select_path
from multimax.flex import FLEX_AVAILABLE
from multimax.normalizers import attention_layer_options


def make_multimax(cfg: DictConfig, device: torch.device) -> multimax.Normalizer:
    name, options = normalizer_options(cfg, "attention")
    normalizer = multimax.build_normalizer(name, **options).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in normalizer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * cfg.sigma_std)
    return normalizer


def attention_rows(shape, device, dtype, mm, names: Sequence[str], inference_names=()):
    """(training rows, inference rows) of one attention shape."""
    g = torch.Generator(device="cpu").manual_seed(1)
    b, h, n, d = shape.batch, shape.heads, shape.tokens, shape.head_dim
    causal = bool(shape.causal)
    scale = 1.0 / math.sqrt(d)
    q, k, v = (
        torch.randn(b, h, n, d, generator=g).to(device, dtype).requires_grad_() for _ in "qkv"
    )
    grad_out = torch.randn(b, h, n, d, generator=g).to(device, dtype)
    softmax = multimax.build_normalizer("softmax")
    leaves = [q, k, v, *mm.parameters()]

    def clear() -> None:
        for t in leaves:
            t.grad = None

    def with_backward(forward: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            clear()
            forward().backward(grad_out)

        return run

    def library(normalizer, impl):
        return lambda: multimax.attention(
            q, k, v, normalizer, is_causal=causal, scale=scale, impl=impl
        )

    makers: dict[str, tuple[str, Callable[[], Callable[[], Tensor]] | None, str]] = {
        "softmax/sdpa": ("softmax", lambda: library(softmax, "sdpa"), "torch SDPA"),
        "softmax/eager": (
            "softmax",
            lambda: lambda: eager_softmax_attention(q, k, v, causal, scale),
            "matmul, softmax, matmul",
        ),
        "multimax/authors-eager": (
            "multimax",
            lambda: lambda: authors_attention(authors_sigma, mm)(q, k, v, causal, scale),
            "σ op by op, then softmax (the authors' form)",
        ),
        "multimax/authors-torchscript": (
            "multimax",
            lambda: lambda: authors_attention(scripted_sigma(), mm)(q, k, v, causal, scale),
            "the same σ through torch.jit.script",
        ),
        "multimax/reference": ("multimax", lambda: library(mm, "reference"), "library reference"),
        "multimax/fused": ("multimax", lambda: library(mm, "fused"), "tiled σ+softmax Function"),
        "multimax/flex": ("multimax", lambda: library(mm, "flex"), "FlexAttention score_mod"),
        "multimax/auto": ("multimax", lambda: library(mm, "auto"), "what impl=auto picks"),
    }

    def probe(normalizer) -> str:
        return select_path(AttentionInputs(q, k, v, normalizer, None, None, causal, 0.0, scale))

    rows = []
    for name in names:
        if name not in makers:
            normalizer = other_normalizer(name, h, device)
            if normalizer.causal_only and not causal:
                continue  # stick-breaking: causal attention only
            leaves.extend(normalizer.parameters())
            impl = name.split("/")[1]
            note = f"auto → {probe(normalizer)}" if impl == "auto" else f"impl={impl}"
            fwd = library(normalizer, impl)
            rows.append(Row(name, name.split("/")[0], fwd, with_backward(fwd), note, reset=clear))
            continue
        kind, make, note = makers[name]
        if name == "multimax/flex" and not (device.type == "cuda" and FLEX_AVAILABLE):
            continue
        if name == "multimax/auto":
            note = f"auto → {probe(mm)}"
        fwd = make()
        rows.append(Row(f"{name}", kind, fwd, with_backward(fwd), note, reset=clear))

    inference = []
    for name in inference_names:
        normalizer, impl = (softmax, "sdpa") if name.startswith("softmax") else (mm, "inference")
        fn = library(normalizer, impl)

        def no_grad(fn=fn) -> None:
            with torch.no_grad():
                fn()

        inference.append(Row(name, name.split("/")[0], no_grad, None, f"impl={impl}, no grad"))
    return rows, inference


def other_normalizer(row: str, heads: int, device: torch.device) -> multimax.Normalizer:
    """The normaliser of an attention row ``NAME/IMPL`` (NAME registered, not multimax or
    softmax, whose rows are fixed), at its initial values, per head as an attention layer
    builds it."""
    name, _, impl = row.partition("/")
    if (
        name in ("multimax", "softmax")
        or name not in multimax.NORMALIZERS
        or (impl != "auto" and impl not in ATTENTION_PATHS)
    ):
        raise ValueError(
            f"unknown attention benchmark row {row!r}: write NAME/IMPL with NAME one of "
            f"{', '.join(n for n in multimax.NORMALIZERS if n not in ('multimax', 'softmax'))} "
            f"and IMPL auto or one of {', '.join(ATTENTION_PATHS)}"
        )
    options = attention_layer_options(name, heads)
    return multimax.build_normalizer(name, **options).to(device)


def output_rows(oc, case, device, mm) -> tuple[list[Row], list[str]]:
    """The output layer's rows for one (tokens, vocabulary) case, and notes on rows skipped
    because their logits would not fit in memory here."""
    g = torch.Generator().manual_seed(2)
    tokens, vocab, dim = int(case.tokens), int(case.vocab), int(oc.dim)
    dtype = getattr(torch, oc.dtype)
    x = torch.randn(tokens, dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / math.sqrt(dim)).to(device, dtype)
    weight.requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    smoothing = float(oc.label_smoothing)
    softmax_loss = multimax.build_loss("softmax", smoothing)
    chunked = multimax.NormalizerLoss(mm, smoothing, chunked=True)
    standard = standard_output_loss(mm, smoothing)
    losses = {
        "softmax/linear+cross_entropy": (
            "softmax",
            lambda: softmax_loss(F.linear(x, weight), target),
            "linear, then torch cross_entropy (SoftMax)",
            oc.bytes_per_logit.softmax,
        ),
        "multimax/standard": (
            "multimax",
            lambda: standard(x, weight, target),
            "linear, σ op by op, cross_entropy",
            oc.bytes_per_logit.standard,
        ),
        "multimax/linear+chunked": (
            "multimax",
            lambda: chunked(F.linear(x, weight), target),
            "linear, then the chunked σ + cross-entropy (logits held)",
            oc.bytes_per_logit.chunked,
        ),
        "multimax/fused": (
            "multimax",
            lambda: multimax.linear_sigma_cross_entropy(
                x, weight, target, mm, label_smoothing=smoothing
            )[0],
            "linear_sigma_cross_entropy: no logits held",
            0,
        ),
    }
    leaves = (x, weight, *mm.parameters())

    def clear() -> None:
        for t in leaves:
            t.grad = None

    rows, notes = [], []
    free = available_bytes(device)
    for name in oc.rows:
        kind, loss_fn, note, bytes_per_logit = losses[name]
        needs = tokens * vocab * float(bytes_per_logit)
        if needs > oc.memory_share * free:
            notes.append(
                f"{name} skipped at {tokens} tokens × {vocab}: it needs about {needs / 2**30:.0f}"
                f" GiB ({bytes_per_logit} bytes per logit), this machine has "
                f"{free / 2**30:.0f} GiB free"
            )
            continue

        def run(loss_fn=loss_fn) -> None:
            clear()
            loss_fn().backward()

        rows.append(Row(name, kind, None, run, note, reset=clear))
    return rows, notes


def model_rows(cfg, device) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    mc = cfg.models
    g = torch.Generator().manual_seed(3)
    name_mm = normalizer_options(cfg, "attention")[0]

    def train_step(model: nn.Module, loss_of: Callable[[], Tensor]):
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            optim.zero_grad(set_to_none=True)
            loss_of().backward()
            optim.step()

        return step, lambda: optim.zero_grad(set_to_none=True)

    if mc.deit_small.enabled:
        try:
            import timm

            importlib.import_module("multimax.integrations.timm")  # registers DeiT-GAP models

            images = torch.randn(mc.deit_small.batch, 3, 224, 224, generator=g).to(device)
            labels = torch.randint(0, 1000, (mc.deit_small.batch,), generator=g).to(device)
            for kind in ("softmax", name_mm):
                model = timm.create_model(
                    "deit_small_gap_patch16_224", normalizer=kind, output_normalizer=kind
                ).to(device)
                loss_fn = multimax.build_loss(model.output_normalizer, label_smoothing=0.1)
                step, clear = train_step(model, lambda m=model, f=loss_fn: f(m(images), labels))
                label = "softmax" if kind == "softmax" else "multimax"
                rows.append(
                    Row(
                        f"deit_small/{label}",
                        label,
                        None,
                        step,
                        f"timm deit_small_gap_patch16_224, batch {mc.deit_small.batch}, AdamW step",
                        reset=clear,
                    )
                )
        except ImportError as err:
            notes.append(f"DeiT-small row skipped: {err}")
    if mc.lm.enabled:
        lm = mc.lm
        tokens = torch.randint(0, lm.vocab, (lm.batch, lm.tokens), generator=g).to(device)
        for kind in ("softmax", name_mm):
            model = StandInLM(lm.vocab, lm.dim, lm.heads, lm.layers, lm.tokens, kind).to(device)
            label = "softmax" if kind == "softmax" else "multimax"
            note = (
                f"stand-in causal LM ({lm.layers} layers, dim {lm.dim}, {lm.heads} heads, "
                f"{lm.batch}×{lm.tokens} tokens, vocab {lm.vocab}), AdamW step"
            )
            step, clear = train_step(model, lambda m=model: m.loss(m(tokens), tokens))
            rows.append(Row(f"lm/{label}", label, None, step, note, reset=clear))
    return rows, notes

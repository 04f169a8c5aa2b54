"""Speed and peak memory of MultiMax against SoftMax, measured side by side in one process.

    python -m experiments.benchmark [attention.shapes=...] [repeats=10] [threads=2]

Rows of each section run interleaved: after ``warmup`` untimed runs (compiles happen there),
each round times every row once, so the rows of one round share the machine's load. Each
ratio is taken within a round (a row's time over its reference row's time in that round)
and reported as the median over the rounds with the range, ``median [min–max]``; a target
counts as met on the median. Time and memory are compared against what a user would
otherwise run: PyTorch SDPA softmax for attention, ``linear`` → ``F.cross_entropy(σ(z))``
for the output layer, the softmax model for training steps. Writes
``results/speed_cpu.md`` (``speed_gpu.md`` on a GPU) and the run's ``results.json``. Peak
memory: on the CPU the high-water mark of live bytes in torch's CPU allocator during one
call, from ``torch.profiler`` memory events (inputs excluded); on a GPU
``torch.cuda.max_memory_allocated`` over the call.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import multimax
from experiments.core.io import REPO_ROOT, atomic_write_text, git_commit
from experiments.core.results import RunResult, write_results
from experiments.core.rundir import hydra_run_dir
from experiments.core.setup import normalizer_options, seed_everything
from multimax.attention import AttentionInputs, select_path
from multimax.flex import FLEX_AVAILABLE
from multimax.fused import set_compile_policy

MIB = 2**20


# --- measurement --------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated above the starting point while ``fn()`` runs."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def available_bytes(device: torch.device) -> int:
    """Memory free for one more allocation: the device's free memory, or the host's
    available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not a POSIX host: assume it fits
        return 1 << 62


@dataclass
class Row:
    """One measured thing: ``fwd()`` and optionally ``fwd_bwd()``; ``kind`` softmax|multimax."""

    name: str
    kind: str
    fwd: Callable[[], object] | None
    fwd_bwd: Callable[[], object] | None = None
    note: str = ""
    reset: Callable[[], None] | None = None  # drops the last run's gradients before a peak
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwd_bwd": []})
    peak: dict[str, float] = field(default_factory=dict)

    def median_ms(self, what: str) -> float | None:
        t = self.times[what]
        return 1000 * statistics.median(t) if t else None


def measure(rows: list[Row], warmup: int, repeats: int, device: torch.device, label: str) -> None:
    """Interleaved timing (warm-up, then ``repeats`` rounds over all rows, each round in its
    own shuffled order), then peak memory."""
    start = time.perf_counter()
    jobs = [(row, what) for row in rows for what in ("fwd", "fwd_bwd") if getattr(row, what)]
    for _ in range(warmup):
        for row, what in jobs:
            getattr(row, what)()
    print(f"[benchmark] {label}: warm-up done in {time.perf_counter() - start:.0f}s")
    start = time.perf_counter()
    for rep in range(repeats):
        # Each round in its own (seeded) order: a row that always ran after the same
        # neighbour would carry that neighbour's allocations and cache footprint every round.
        order = random.Random(rep).sample(jobs, len(jobs))
        for row, what in order:
            _sync(device)
            t0 = time.perf_counter()
            getattr(row, what)()
            _sync(device)
            row.times[what].append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        eta = elapsed / (rep + 1) * (repeats - rep - 1)
        print(f"[benchmark] {label}: round {rep + 1}/{repeats}, {elapsed:.0f}s, ETA {eta:.0f}s")
    for row, what in jobs:
        if row.reset is not None:
            # Frees of blocks allocated before the profiler started are not all reported,
            # so the last run's gradients are dropped before the measured call.
            row.reset()
        row.peak[what] = peak_bytes(getattr(row, what), device) / MIB


@dataclass(frozen=True)
class Spread:
    """A ratio over the rounds: median, smallest and largest."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f} [{self.low:.2f}–{self.high:.2f}]"


def round_ratios(row: Row | None, ref: Row | None, what: str) -> Spread | None:
    """``row``'s time over ``ref``'s, round by round (the rows ran interleaved)."""
    if row is None or ref is None or not row.times[what] or not ref.times[what]:
        return None
    ratios = [a / b for a, b in zip(row.times[what], ref.times[what], strict=True) if b > 0]
    if not ratios:
        return None
    return Spread(statistics.median(ratios), min(ratios), max(ratios))


def peak_ratio(row: Row | None, ref: Row | None, what: str) -> float | None:
    if row is None or ref is None:
        return None
    a, b = row.peak.get(what), ref.peak.get(what)
    return None if a is None or not b else a / b


# --- the authors' form of MultiMax (written from the paper's formula) ----------------------


def authors_sigma(x: Tensor, b: Tensor, d: Tensor, a: Tensor, c: Tensor) -> Tensor:
    """σ(x) = x + Σ_k a_k·clamp(b_k − x, 0)^k + c_k·clamp(x − d_k, 0)^k, one op at a time."""
    out = x
    for k in range(b.shape[0]):
        out = out + a[k] * torch.clamp(b[k] - x, min=0) ** (k + 1)
        out = out + c[k] * torch.clamp(x - d[k], min=0) ** (k + 1)
    return out


_scripted_sigma = None


def scripted_sigma() -> Callable:
    global _scripted_sigma
    if _scripted_sigma is None:
        with warnings.catch_warnings():  # torch.jit.script is deprecated, but it is the anchor
            warnings.simplefilter("ignore", FutureWarning)
            _scripted_sigma = torch.jit.script(authors_sigma)
    return _scripted_sigma


def authors_attention(sigma_fn: Callable, normalizer) -> Callable:
    lt, ht, lc, hc = normalizer.sigma_parameters()

    def run(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
        scores = sigma_fn(torch.matmul(q, k.transpose(-2, -1)) * scale, lt, ht, lc, hc)
        if causal:
            n, m = scores.shape[-2:]
            keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
            scores = scores.masked_fill(~keep, float("-inf"))
        return torch.matmul(torch.softmax(scores, -1), v)

    return run


def eager_softmax_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        n, m = scores.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v)


# --- sections -----------------------------------------------------------------------------


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
    probe = AttentionInputs(q, k, v, mm, None, None, causal, 0.0, scale)
    rows = []
    for name in names:
        kind, make, note = makers[name]
        if name == "multimax/flex" and not (device.type == "cuda" and FLEX_AVAILABLE):
            continue
        if name == "multimax/auto":
            note = f"auto → {select_path(probe)}"
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


def standard_output_loss(mm, smoothing: float):
    """What one writes without this library: ``linear`` → σ op by op → ``cross_entropy``."""

    def loss(x: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        z = F.linear(x, weight).float()
        return F.cross_entropy(mm.modulate(z), target, label_smoothing=smoothing)

    return loss


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


class StandInLM(nn.Module):
    """A small causal decoder over :func:`multimax.attention` (pre-norm blocks), standing in
    for fairseq's transformer_lm in the step-time comparison. ``forward`` returns the
    features; ``loss`` applies the output layer as the fairseq criterion does (σ + cross-
    entropy from the features, no logits, for MultiMax; linear + cross-entropy for softmax)."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, tokens: int, name: str):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "ln2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(
                        nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
                    ),
                }
            )
            block.normalizer = multimax.build_normalizer(name)
            self.blocks.append(block)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.output_normalizer = multimax.build_normalizer(name)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n = tokens.shape
        x = self.embed(tokens) + self.pos[:n]
        for block in self.blocks:
            qkv = block["qkv"](block["ln1"](x)).reshape(b, n, 3, self.heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            a = multimax.attention(q, k, v, block.normalizer, is_causal=True)
            x = x + block["proj"](a.transpose(1, 2).reshape(b, n, -1))
            x = x + block["mlp"](block["ln2"](x))
        return self.ln(x)

    def loss(self, features: Tensor, target: Tensor) -> Tensor:
        if self.output_normalizer.is_plain_softmax:
            return F.cross_entropy(self.head(features).flatten(0, -2), target.flatten())
        return multimax.linear_sigma_cross_entropy(
            features, self.head.weight, target, self.output_normalizer
        )[0]


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


# --- report -------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _spread(s: Spread | None) -> str:
    return "n/a" if s is None else str(s)


def find(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.name == name), None)


@dataclass
class Section:
    """Rows measured together, with the row their ratios refer to."""

    title: str
    rows: list[Row]
    ref: str
    whats: tuple[str, ...] = ("fwd", "fwd_bwd")


def table(section: Section) -> list[str]:
    ref = find(section.rows, section.ref)
    short = section.ref.split("/", 1)[-1]
    head = ["row", "what"]
    for what in section.whats:
        label = "fwd+bwd" if what == "fwd_bwd" else what
        head += [f"{label} ms", f"{label} ×{short}"]
    head += ["peak MiB", f"peak ×{short}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = section.whats[-1]
    for r in section.rows:
        cells = [r.name, r.note]
        for what in section.whats:
            cells += [_fmt(r.median_ms(what)), _spread(round_ratios(r, ref, what))]
        cells += [_fmt(r.peak.get(last)), _fmt(peak_ratio(r, ref, last), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def scaling_table(sections: dict[str, Section], what: str) -> list[str]:
    """One line per sequence length: SoftMax and MultiMax time and memory, and the ratios."""
    label = "fwd+bwd" if what == "fwd_bwd" else "forward, no grad"
    lines = [
        f"| N | SDPA {label} ms | MultiMax ms | time ×SDPA | SDPA peak MiB | MultiMax peak MiB "
        "| peak ×SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    prefix = "scaling " if what == "fwd_bwd" else "scaling inference "
    for key, section in sections.items():
        if not key.startswith(prefix) or (what == "fwd_bwd" and "inference" in key):
            continue
        sdpa = find(section.rows, section.ref)
        mm = next((r for r in section.rows if r.kind == "multimax"), None)
        if sdpa is None or mm is None:
            continue
        cells = [
            key.rsplit(" ", 1)[-1],
            _fmt(sdpa.median_ms(what)),
            _fmt(mm.median_ms(what)),
            _spread(round_ratios(mm, sdpa, what)),
            _fmt(sdpa.peak.get(what)),
            _fmt(mm.peak.get(what)),
            _fmt(peak_ratio(mm, sdpa, what), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def machine_lines(device: torch.device) -> list[str]:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    what = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return [
        f"- machine: {what}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, Python "
        f"{platform.python_version()}, device {device}",
        f"- git commit {git_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


def load_line(loads: Sequence[tuple[float, float, float]]) -> str:
    """The load averages seen while measuring (each section's start and end)."""
    ones = [load[0] for load in loads]
    return (
        f"- load average (1 min) during the run: {min(ones):.1f} to {max(ones):.1f} on "
        f"{os.cpu_count()} logical CPUs (a shared machine: ratios within a round, not absolute "
        "times, are what compares)"
    )


@dataclass(frozen=True)
class Target:
    what: str
    value: Spread | float | None
    goal: float
    below: bool = True

    @property
    def median(self) -> float | None:
        return self.value.median if isinstance(self.value, Spread) else self.value

    def line(self) -> str:
        value = self.median
        met = "n/a" if value is None else ("yes" if (value <= self.goal) == self.below else "no")
        shown = self.value if isinstance(self.value, Spread) else _fmt(self.value, 2)
        sign = "≤" if self.below else "≥"
        return f"| {self.what} | {'n/a' if value is None else shown} | {sign} {self.goal} | {met} |"


def targets(sections: dict[str, Section], cfg, device: torch.device) -> list[Target]:
    """The issue's targets, measured against the rows above (time: median [range] of the
    per-round ratios; memory: one measured peak over another)."""
    out: list[Target] = []
    goal = cfg.targets

    def rows_of(key: str) -> list[Row]:
        return sections[key].rows if key in sections else []

    for shape in ("deit_small", "lm"):
        att = rows_of(f"attention {shape}")
        sdpa, auto = find(att, "softmax/sdpa"), find(att, "multimax/auto")
        label = SHAPE_LABELS.get(shape, shape)
        out.append(
            Target(
                f"attention fwd+bwd time, {label}: multimax (auto) / SDPA softmax",
                round_ratios(auto, sdpa, "fwd_bwd"),
                goal.attention_time,
            )
        )
    att, inf = rows_of("attention lm"), rows_of("inference lm")
    label = SHAPE_LABELS.get("lm", "lm")
    out.append(
        Target(
            f"attention training peak memory, {label}: multimax (auto) / SDPA softmax",
            peak_ratio(find(att, "multimax/auto"), find(att, "softmax/sdpa"), "fwd_bwd"),
            goal.attention_memory,
        )
    )
    out.append(
        Target(
            f"attention inference peak memory, {label}: multimax / SDPA softmax",
            peak_ratio(find(inf, "multimax/inference"), find(inf, "softmax/sdpa"), "fwd"),
            goal.attention_memory,
        )
    )
    att = rows_of("attention deit_small")
    out.append(
        Target(
            "anchor: authors' eager form / multimax (auto), fwd+bwd time, DeiT-small shape",
            round_ratios(
                find(att, "multimax/authors-eager"), find(att, "multimax/auto"), "fwd_bwd"
            ),
            goal.authors_anchor,
            below=False,
        )
    )
    for key, section in sections.items():
        if not key.startswith("output "):
            continue
        std, fused = find(section.rows, "multimax/standard"), find(section.rows, "multimax/fused")
        case = key.removeprefix("output ")
        out.append(
            Target(
                f"output layer time, {OUTPUT_LABELS.get(case, case)}: fused / standard",
                round_ratios(fused, std, "fwd_bwd"),
                goal.output_time,
            )
        )
        out.append(
            Target(
                f"output layer peak memory, {OUTPUT_LABELS.get(case, case)}: fused / standard",
                peak_ratio(fused, std, "fwd_bwd"),
                goal.output_memory,
            )
        )
    models = rows_of("model deit_small")
    out.append(
        Target(
            "DeiT-small training step time: multimax / softmax",
            round_ratios(
                find(models, "deit_small/multimax"), find(models, "deit_small/softmax"), "fwd_bwd"
            ),
            goal.deit_step,
        )
    )
    return out


SHAPE_LABELS: dict[str, str] = {}
OUTPUT_LABELS: dict[str, str] = {}
SECTION_TITLES: dict[str, str] = {}


def write_report(cfg, device, sections, notes, loads, seconds) -> Path:
    rounds = ", ".join(
        f"{cfg[key].repeats if key != 'attention' else cfg.repeats} ({key.replace('_', ' ')})"
        for key in ("attention", "scaling", "output_layer", "models")
    )
    lines = [f"# MultiMax vs SoftMax: speed and memory ({device.type.upper()})", ""]
    lines += machine_lines(device)
    lines += [
        load_line(loads),
        f"- command: `{' '.join(['python -m experiments.benchmark', *sys.argv[1:]])}`",
        f"- interleaved rounds: {rounds}, after {cfg.warmup} warm-up runs "
        f"({cfg.output_layer.warmup} for the output layer); compile policy "
        f"`{cfg.compile_policy}`; σ parameters ~ N(0, {cfg.sigma_std}²); {seconds:.0f} s in all",
        "- `×ref`: the row's time over the reference row's time in the same round, as the "
        "median over the rounds [smallest–largest]; a target is met on the median",
        "- peak memory: "
        + (
            "torch.cuda.max_memory_allocated over one call, above what was allocated before"
            if device.type == "cuda"
            else "high-water mark of live bytes in torch's CPU allocator during one call, "
            "summed from torch.profiler memory events (profile_memory=True); inputs excluded"
        ),
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
        *(t.line() for t in targets(sections, cfg, device)),
        "",
    ]
    if any(key.startswith("scaling ") for key in sections):
        lines += [
            f"## Scaling with the sequence length: {SECTION_TITLES.get('scaling', 'causal')}",
            "",
            "Training (forward + backward):",
            "",
            *scaling_table(sections, "fwd_bwd"),
            "",
            "Inference (forward, no grad):",
            "",
            *scaling_table(sections, "fwd"),
            "",
        ]
    for key, section in sections.items():
        if key.startswith("scaling "):
            continue
        lines += [f"## {SECTION_TITLES.get(key, key)}", "", *table(section), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    name = f"speed_{'gpu' if device.type == 'cuda' else 'cpu'}.md"
    path = REPO_ROOT / cfg.out_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines))
    return path


def _shape_label(shape) -> str:
    return (
        f"B {shape.batch}, H {shape.heads}, N {shape.tokens}, D {shape.head_dim}"
        f"{', causal' if shape.causal else ''}"
    )


def run(cfg: DictConfig) -> None:
    """Measure every configured section and write the report into the Hydra run dir."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    set_compile_policy(cfg.compile_policy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = cfg.attention.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    mm = make_multimax(cfg, device)
    sections: dict[str, Section] = {}
    notes: list[str] = []
    loads: list[tuple[float, float, float]] = [os.getloadavg()]

    def run(key: str, rows, ref: str, repeats: int, whats=("fwd", "fwd_bwd"), warmup=None):
        measure(rows, cfg.warmup if warmup is None else warmup, repeats, device, key)
        loads.append(os.getloadavg())
        sections[key] = Section(key, rows, ref, whats)

    shapes = dict(cfg.attention.shapes)
    if device.type == "cuda":
        shapes.update(cfg.attention.get("gpu_shapes") or {})
    for name, shape in shapes.items():
        names = shape.get("rows") or cfg.attention.rows
        rows, inference = attention_rows(
            shape, device, dtype, mm, names, cfg.attention.inference_rows
        )
        repeats = int(shape.get("repeats") or cfg.repeats)
        label = _shape_label(shape)
        SHAPE_LABELS[name] = f"{name} shape ({label})"
        SECTION_TITLES[f"attention {name}"] = f"Attention, {name} ({label}, {dtype_name})"
        SECTION_TITLES[f"inference {name}"] = (
            f"Attention inference (no grad), {name} ({label}, {dtype_name})"
        )
        # Training and inference rows interleaved in one set of rounds.
        measure(rows + inference, cfg.warmup, repeats, device, f"attention {name}")
        loads.append(os.getloadavg())
        sections[f"attention {name}"] = Section(f"attention {name}", rows, "softmax/sdpa")
        sections[f"inference {name}"] = Section(
            f"inference {name}", inference, "softmax/sdpa", ("fwd",)
        )
    sc = cfg.scaling
    for tokens in sc.tokens or []:
        shape = OmegaConf.create({**OmegaConf.to_container(sc.shape), "tokens": int(tokens)})
        rows, inference = attention_rows(shape, device, dtype, mm, sc.rows, sc.inference_rows)
        measure(rows + inference, cfg.warmup, sc.repeats, device, f"scaling N={tokens}")
        loads.append(os.getloadavg())
        sections[f"scaling {tokens}"] = Section(f"scaling {tokens}", rows, "softmax/sdpa")
        sections[f"scaling inference {tokens}"] = Section(
            f"scaling inference {tokens}", inference, "softmax/sdpa", ("fwd",)
        )
        SECTION_TITLES["scaling"] = (
            f"B {shape.batch}, H {shape.heads}, D {shape.head_dim}"
            f"{', causal' if shape.causal else ''}, {dtype_name}"
        )
    oc = cfg.output_layer
    for case_name, case in (oc.cases or {}).items():
        rows, skipped = output_rows(oc, case, device, mm)
        notes += skipped
        if not rows:
            continue
        label = f"{case.tokens} tokens × {case.vocab} vocabulary, d {oc.dim}"
        OUTPUT_LABELS[case_name] = label
        SECTION_TITLES[f"output {case_name}"] = (
            f"Output layer: σ + cross-entropy from the hidden states, {label}, {oc.dtype}, "
            f"label smoothing {oc.label_smoothing}, fwd+bwd"
        )
        run(f"output {case_name}", rows, "multimax/standard", oc.repeats, ("fwd_bwd",), oc.warmup)
    rows, model_notes = model_rows(cfg, device)
    notes += model_notes
    for model in dict.fromkeys(r.name.split("/")[0] for r in rows):
        SECTION_TITLES[f"model {model}"] = (
            f"Whole-model training step (fwd, bwd, AdamW): "
            f"{'DeiT-small' if model == 'deit_small' else 'language model'}"
        )
        run(
            f"model {model}",
            [r for r in rows if r.name.startswith(f"{model}/")],
            f"{model}/softmax",
            cfg.models.repeats,
            ("fwd_bwd",),
        )
    path = write_report(cfg, device, sections, notes, loads, time.perf_counter() - started)
    print(path.read_text())
    print(f"[benchmark] wrote {path}")
    att = sections.get("attention deit_small")
    ratio = None
    if att is not None:
        spread = round_ratios(
            find(att.rows, "multimax/auto"), find(att.rows, "softmax/sdpa"), "fwd_bwd"
        )
        ratio = None if spread is None else spread.median
    metrics = {
        f"{key}/{r.name}/{what}_ms": r.median_ms(what)
        for key, section in sections.items()
        for r in section.rows
        for what in ("fwd", "fwd_bwd")
        if r.median_ms(what) is not None
    }
    write_results(
        hydra_run_dir(),
        RunResult(
            task="benchmark",
            dataset="synthetic",
            model="attention+output layer+models",
            normalizer=normalizer_options(cfg, "attention")[0],
            output_normalizer=normalizer_options(cfg, "output")[0],
            seed=int(cfg.seed),
            metric_name="attention_fwd_bwd_ratio_to_sdpa",
            metric_value=float("nan") if ratio is None else ratio,
            steps=int(cfg.repeats),
            wall_seconds=time.perf_counter() - started,
            profile=str(cfg.profile.name) if "profile" in cfg else "paper",
            metrics=metrics,
        ),
        OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)),
    )

"""Speed and peak memory of MultiMax against SoftMax, measured side by side in one process.

    python -m experiments.benchmark [attention.shapes=...] [repeats=10] [threads=2]

Rows of each section run interleaved (one repetition of every row, then the next), after
``warmup`` untimed runs (compiles happen there); tables show medians and ratios to the
fastest SoftMax row. Writes ``results/speed_cpu.md`` (``speed_gpu.md`` on a GPU) and the
run's ``results.json``. Peak memory: on the CPU the high-water mark of live bytes in torch's
CPU allocator during one call, from ``torch.profiler`` memory events (inputs excluded); on a
GPU ``torch.cuda.max_memory_allocated`` over the call.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import multimax
from experiments import runtime
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
    """Interleaved timing (warm-up, then ``repeats`` rounds over all rows), then peak memory."""
    start = time.perf_counter()
    jobs = [(row, what) for row in rows for what in ("fwd", "fwd_bwd") if getattr(row, what)]
    for _ in range(warmup):
        for row, what in jobs:
            getattr(row, what)()
    print(f"[benchmark] {label}: warm-up done in {time.perf_counter() - start:.0f}s")
    start = time.perf_counter()
    for rep in range(repeats):
        for row, what in jobs:
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
    name, options = runtime.normalizer_options(cfg, "attention")
    normalizer = multimax.build_normalizer(name, **options).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in normalizer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * cfg.sigma_std)
    return normalizer


def attention_section(cfg, shape_name, shape, device, dtype, mm) -> tuple[list[Row], list[Row]]:
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
        "multimax/fused": ("multimax", lambda: library(mm, "fused"), "fused σ+softmax Function"),
        "multimax/flex": ("multimax", lambda: library(mm, "flex"), "FlexAttention score_mod"),
        "multimax/auto": ("multimax", lambda: library(mm, "auto"), "what impl=auto picks"),
    }
    probe = AttentionInputs(q, k, v, mm, None, None, causal, 0.0, scale)
    rows = []
    for name in cfg.attention.rows:
        kind, make, note = makers[name]
        if name == "multimax/flex" and not (device.type == "cuda" and FLEX_AVAILABLE):
            continue
        if name == "multimax/auto":
            note = f"auto → {select_path(probe)}"
        fwd = make()
        rows.append(Row(f"{name}", kind, fwd, with_backward(fwd), note, reset=clear))

    inference = []
    for name in cfg.attention.inference_rows:
        normalizer, impl = (softmax, "sdpa") if name.startswith("softmax") else (mm, "inference")
        fn = library(normalizer, impl)

        def no_grad(fn=fn) -> None:
            with torch.no_grad():
                fn()

        inference.append(Row(name, name.split("/")[0], no_grad, None, f"impl={impl}, no grad"))
    return rows, inference


def output_section(cfg, device, mm) -> list[Row]:
    oc = cfg.output_layer
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(oc.tokens, oc.vocab, generator=g).to(device).requires_grad_()
    target = torch.randint(0, oc.vocab, (oc.tokens,), generator=g).to(device)
    losses = {
        "softmax/cross_entropy": ("softmax", multimax.build_loss("softmax", oc.label_smoothing)),
        "multimax/chunked": (
            "multimax",
            multimax.NormalizerLoss(mm, oc.label_smoothing, chunked=True),
        ),
        "multimax/unchunked": (
            "multimax",
            multimax.NormalizerLoss(mm, oc.label_smoothing, chunked=False),
        ),
    }
    rows = []
    for name in oc.rows:
        kind, loss_fn = losses[name]

        def run(loss_fn=loss_fn) -> None:
            for t in (logits, *mm.parameters()):
                t.grad = None
            loss_fn(logits, target).backward()

        def clear() -> None:
            for t in (logits, *mm.parameters()):
                t.grad = None

        rows.append(Row(name, kind, None, run, "σ + cross-entropy, label smoothing", reset=clear))
    return rows


class StandInLM(nn.Module):
    """A small causal decoder over :func:`multimax.attention` (pre-norm blocks), standing in
    for fairseq's transformer_lm in the step-time comparison."""

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
        return self.head(self.ln(x))


def model_section(cfg, device) -> tuple[list[Row], list[str]]:
    rows, notes = [], []
    mc = cfg.models
    g = torch.Generator().manual_seed(3)
    name_mm = runtime.normalizer_options(cfg, "attention")[0]

    def train_step(model: nn.Module, batch: Tensor, target: Tensor, loss_fn):
        optim = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            optim.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch).reshape(-1, model_vocab(model)), target.reshape(-1))
            loss.backward()
            optim.step()

        return step, lambda: optim.zero_grad(set_to_none=True)

    def model_vocab(model: nn.Module) -> int:
        return model.head.out_features if hasattr(model.head, "out_features") else 1000

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
                step, clear = train_step(model, images, labels, loss_fn)
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
            loss_fn = multimax.build_loss(model.output_normalizer)
            label = "softmax" if kind == "softmax" else "multimax"
            note = (
                f"stand-in causal LM ({lm.layers} layers, dim {lm.dim}, {lm.heads} heads, "
                f"{lm.batch}×{lm.tokens} tokens, vocab {lm.vocab}), AdamW step"
            )
            step, clear = train_step(model, tokens, tokens, loss_fn)
            rows.append(Row(f"lm/{label}", label, None, step, note, reset=clear))
    return rows, notes


# --- report -------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def best(rows: list[Row], kind: str, what: str) -> float | None:
    values = [r.median_ms(what) for r in rows if r.kind == kind and r.median_ms(what)]
    return min(values) if values else None


def find(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.name == name), None)


def table(rows: list[Row], mem_ref: str | None, whats=("fwd", "fwd_bwd")) -> list[str]:
    head = ["row", "what"]
    for what in whats:
        head += [f"{what} ms", f"{what} ×best softmax"]
    head += ["peak MiB", f"peak ×{mem_ref}" if mem_ref else "peak ×softmax"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref_row = find(rows, mem_ref) if mem_ref else None
    last = whats[-1]
    for r in rows:
        cells = [r.name, r.note]
        for what in whats:
            ms = r.median_ms(what)
            cells += [_fmt(ms), _fmt(_ratio(ms, best(rows, "softmax", what)), 2)]
        peak = r.peak.get(last)
        ref_peak = ref_row.peak.get(last) if ref_row else None
        cells += [_fmt(peak), _fmt(_ratio(peak, ref_peak), 2)]
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
        f"- git commit {runtime.git_commit()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(shared machine: compare ratios, not absolute times)",
    ]


def target_lines(sections: dict[str, list[Row]], device: torch.device) -> list[str]:
    """The issue's targets, measured against the rows above."""
    out = ["| target | measured | goal | met |", "|---|---|---|---|"]

    def add(what: str, value: float | None, goal: float, below: bool = True) -> None:
        met = "n/a" if value is None else ("yes" if (value <= goal) == below else "no")
        sign = "≤" if below else "≥"
        out.append(f"| {what} | {_fmt(value, 2)} | {sign} {goal} | {met} |")

    att = sections.get("attention deit_small", [])
    auto, sdpa, eager = (
        find(att, "multimax/auto"),
        find(att, "softmax/sdpa"),
        find(att, "softmax/eager"),
    )
    authors = find(att, "multimax/authors-eager")
    ms = lambda r, w="fwd_bwd": r.median_ms(w) if r else None  # noqa: E731
    pk = lambda r: r.peak.get("fwd_bwd") if r else None  # noqa: E731
    add(
        "attention fwd+bwd, DeiT-small shape: multimax (auto) / SDPA softmax",
        _ratio(ms(auto), ms(sdpa)),
        1.15 if device.type == "cpu" else 1.25,
    )
    add("attention peak memory: multimax (auto) / eager softmax", _ratio(pk(auto), pk(eager)), 1.10)
    add(
        "anchor: authors' eager form / multimax (auto), fwd+bwd",
        _ratio(ms(authors), ms(auto)),
        2.0,
        below=False,
    )
    models = sections.get("model deit_small", [])
    deit_s, deit_m = find(models, "deit_small/softmax"), find(models, "deit_small/multimax")
    add("DeiT-small training step: multimax / softmax", _ratio(ms(deit_m), ms(deit_s)), 1.05)
    out_rows = sections.get("output", [])
    ce, ch = find(out_rows, "softmax/cross_entropy"), find(out_rows, "multimax/chunked")
    add("output layer σ+CE time: multimax (chunked) / softmax CE", _ratio(ms(ch), ms(ce)), 1.10)
    add(
        "output layer σ+CE peak memory: multimax (chunked) / softmax CE",
        _ratio(pk(ch), pk(ce)),
        1.05,
    )
    return out


def write_report(cfg, device, sections, notes, seconds) -> Path:
    lines = [f"# MultiMax vs SoftMax: speed and memory ({device.type.upper()})", ""]
    lines += machine_lines(device)
    lines += [
        f"- command: `python -m experiments.benchmark {' '.join(sys.argv[1:])}`".rstrip(),
        f"- {cfg.warmup} warm-up runs, then the median of {cfg.repeats} (attention) / "
        f"{cfg.output_layer.repeats} (output layer) / {cfg.models.repeats} (models) interleaved "
        f"runs; compile policy `{cfg.compile_policy}`; σ parameters ~ N(0, {cfg.sigma_std}²); "
        f"{seconds:.0f} s in all",
        "- peak memory: "
        + (
            "torch.cuda.max_memory_allocated over one call, above what was allocated before"
            if device.type == "cuda"
            else "high-water mark of live bytes in torch's CPU allocator during one call, "
            "summed from torch.profiler memory events (profile_memory=True); inputs excluded"
        ),
        "- `×best softmax`: median time over the fastest SoftMax row's median in the same table",
        "",
        "## Targets",
        "",
        *target_lines(sections, device),
        "",
    ]
    for title, rows in sections.items():
        if not rows:
            continue
        if title.startswith("attention "):
            mem_ref, whats = "softmax/eager", ("fwd", "fwd_bwd")
        elif title.startswith("inference "):
            mem_ref, whats = "softmax/sdpa", ("fwd",)
        elif title == "output":
            mem_ref, whats = "softmax/cross_entropy", ("fwd_bwd",)
        else:
            mem_ref, whats = f"{title.split()[-1]}/softmax", ("fwd_bwd",)
        lines += [f"## {SECTION_TITLES.get(title, title)}", "", *table(rows, mem_ref, whats), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    name = f"speed_{'gpu' if device.type == 'cuda' else 'cpu'}.md"
    path = runtime.REPO_ROOT / cfg.out_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    runtime.atomic_write_text(path, "\n".join(lines))
    return path


SECTION_TITLES = {
    "output": "Output layer: σ + cross-entropy, fwd+bwd",
    "model deit_small": "Whole-model training step (fwd, bwd, AdamW): DeiT-small",
    "model lm": "Whole-model training step (fwd, bwd, AdamW): language model",
}


@hydra.main(config_path="../configs", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    started = time.perf_counter()
    runtime.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    set_compile_policy(cfg.compile_policy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = cfg.attention.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    mm = make_multimax(cfg, device)
    sections: dict[str, list[Row]] = {}
    notes: list[str] = []
    shapes = dict(cfg.attention.shapes)
    if device.type == "cuda":
        shapes.update(cfg.attention.get("gpu_shapes") or {})
    for shape_name, shape in shapes.items():
        rows, inference = attention_section(cfg, shape_name, shape, device, dtype, mm)
        label = (
            f"{shape_name} (B {shape.batch}, H {shape.heads}, N {shape.tokens}, "
            f"D {shape.head_dim}{', causal' if shape.causal else ''}, {dtype_name})"
        )
        measure(rows + inference, cfg.warmup, cfg.repeats, device, f"attention {shape_name}")
        sections[f"attention {shape_name}"] = rows
        sections[f"inference {shape_name}"] = inference
        SECTION_TITLES[f"attention {shape_name}"] = f"Attention, {label}"
        SECTION_TITLES[f"inference {shape_name}"] = f"Attention inference (no grad), {label}"
    if cfg.output_layer.rows:
        rows = output_section(cfg, device, mm)
        measure(rows, 1, cfg.output_layer.repeats, device, "output layer")
        sections["output"] = rows
        oc = cfg.output_layer
        SECTION_TITLES["output"] = (
            f"Output layer: σ + cross-entropy, {oc.tokens} tokens × {oc.vocab} vocabulary, "
            f"label smoothing {oc.label_smoothing}, fwd+bwd"
        )
    rows, model_notes = model_section(cfg, device)
    notes += model_notes
    if rows:
        measure(rows, 1, cfg.models.repeats, device, "models")
        for model in dict.fromkeys(r.name.split("/")[0] for r in rows):
            sections[f"model {model}"] = [r for r in rows if r.name.startswith(f"{model}/")]
    path = write_report(cfg, device, sections, notes, time.perf_counter() - started)
    print(path.read_text())
    print(f"[benchmark] wrote {path}")
    att = sections.get("attention deit_small", [])
    auto, sdpa = find(att, "multimax/auto"), find(att, "softmax/sdpa")
    ratio = _ratio(auto.median_ms("fwd_bwd"), sdpa.median_ms("fwd_bwd")) if auto and sdpa else None
    metrics = {
        f"{title}/{r.name}/{what}_ms": r.median_ms(what)
        for title, rs in sections.items()
        for r in rs
        for what in ("fwd", "fwd_bwd")
        if r.median_ms(what) is not None
    }
    runtime.write_results(
        runtime.hydra_run_dir(),
        runtime.RunResult(
            task="benchmark",
            dataset="synthetic",
            model="attention+output layer+models",
            normalizer=runtime.normalizer_options(cfg, "attention")[0],
            output_normalizer=runtime.normalizer_options(cfg, "output")[0],
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


if __name__ == "__main__":
    main()

"""The benchmark run: every configured section measured in turn (attention shapes, the
scaling over the sequence length, the output layer, whole-model training steps), then the
report (``results/speed_<cpu|gpu>.md``) and the run's ``results.json``.

    python -m experiments.benchmark [attention.shapes=...] [repeats=10] [threads=2]
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.core.results import RunResult, write_results
from experiments.core.rundir import hydra_run_dir
from experiments.core.setup import normalizer_options, seed_everything
from experiments.pipelines.benchmark.report import Labels, Section, find, write_report
from experiments.pipelines.benchmark.rows import (
    attention_rows,
    make_multimax,
    model_rows,
    output_rows,
)
from experiments.pipelines.benchmark.timing import Row, measure, round_ratios
from multimax.compile_policy import set_compile_policy


def _shape_label(shape) -> str:
    return (
        f"B {shape.batch}, H {shape.heads}, N {shape.tokens}, D {shape.head_dim}"
        f"{', causal' if shape.causal else ''}"
    )


@dataclass
class Bench:
    """The sections measured so far, what the report calls them, and the machine's load at
    each section's start and end."""

    cfg: DictConfig
    device: torch.device
    dtype: torch.dtype
    mm: torch.nn.Module
    sections: dict[str, Section] = field(default_factory=dict)
    labels: Labels = field(default_factory=Labels)
    notes: list[str] = field(default_factory=list)
    loads: list[tuple[float, float, float]] = field(default_factory=lambda: [os.getloadavg()])

    def section(
        self,
        key: str,
        rows: list[Row],
        ref: str,
        repeats: int,
        whats: tuple[str, ...] = ("fwd", "fwd_bwd"),
        warmup: int | None = None,
    ) -> None:
        """Measure ``rows`` in interleaved rounds and keep them as one section."""
        measure(rows, self.cfg.warmup if warmup is None else warmup, repeats, self.device, key)
        self.loads.append(os.getloadavg())
        self.sections[key] = Section(key, rows, ref, whats)

    def attention(
        self,
        key: str,
        inference_key: str,
        label: str,
        shape,
        names: Sequence[str],
        inference_names: Sequence[str],
        repeats: int,
    ) -> None:
        """One attention shape: training and inference rows interleaved in one set of rounds,
        kept as two sections."""
        rows, inference = attention_rows(
            shape, self.device, self.dtype, self.mm, names, inference_names
        )
        measure(rows + inference, self.cfg.warmup, repeats, self.device, label)
        self.loads.append(os.getloadavg())
        self.sections[key] = Section(key, rows, "softmax/sdpa")
        self.sections[inference_key] = Section(inference_key, inference, "softmax/sdpa", ("fwd",))


def measure_attention(bench: Bench, dtype_name: str) -> None:
    cfg = bench.cfg
    shapes = dict(cfg.attention.shapes)
    if bench.device.type == "cuda":
        shapes.update(cfg.attention.get("gpu_shapes") or {})
    for name, shape in shapes.items():
        label = _shape_label(shape)
        bench.labels.shapes[name] = f"{name} shape ({label})"
        bench.labels.sections[f"attention {name}"] = f"Attention, {name} ({label}, {dtype_name})"
        bench.labels.sections[f"inference {name}"] = (
            f"Attention inference (no grad), {name} ({label}, {dtype_name})"
        )
        bench.attention(
            f"attention {name}",
            f"inference {name}",
            f"attention {name}",
            shape,
            shape.get("rows") or cfg.attention.rows,
            cfg.attention.inference_rows,
            int(shape.get("repeats") or cfg.repeats),
        )


def measure_scaling(bench: Bench, dtype_name: str) -> None:
    sc = bench.cfg.scaling
    for tokens in sc.tokens or []:
        shape = OmegaConf.create({**OmegaConf.to_container(sc.shape), "tokens": int(tokens)})
        bench.attention(
            f"scaling {tokens}",
            f"scaling inference {tokens}",
            f"scaling N={tokens}",
            shape,
            sc.rows,
            sc.inference_rows,
            sc.repeats,
        )
        bench.labels.sections["scaling"] = (
            f"B {shape.batch}, H {shape.heads}, D {shape.head_dim}"
            f"{', causal' if shape.causal else ''}, {dtype_name}"
        )


def measure_output_layer(bench: Bench) -> None:
    oc = bench.cfg.output_layer
    for case_name, case in (oc.cases or {}).items():
        rows, skipped = output_rows(oc, case, bench.device, bench.mm)
        bench.notes += skipped
        if not rows:
            continue
        label = f"{case.tokens} tokens × {case.vocab} vocabulary, d {oc.dim}"
        bench.labels.outputs[case_name] = label
        bench.labels.sections[f"output {case_name}"] = (
            f"Output layer: σ + cross-entropy from the hidden states, {label}, {oc.dtype}, "
            f"label smoothing {oc.label_smoothing}, fwd+bwd"
        )
        bench.section(
            f"output {case_name}", rows, "multimax/standard", oc.repeats, ("fwd_bwd",), oc.warmup
        )


def measure_models(bench: Bench) -> None:
    rows, notes = model_rows(bench.cfg, bench.device)
    bench.notes += notes
    for model in dict.fromkeys(r.name.split("/")[0] for r in rows):
        bench.labels.sections[f"model {model}"] = (
            f"Whole-model training step (fwd, bwd, AdamW): "
            f"{'DeiT-small' if model == 'deit_small' else 'language model'}"
        )
        bench.section(
            f"model {model}",
            [r for r in rows if r.name.startswith(f"{model}/")],
            f"{model}/softmax",
            bench.cfg.models.repeats,
            ("fwd_bwd",),
        )


def headline(sections: dict[str, Section]) -> float | None:
    """MultiMax (auto) over SDPA softmax, fwd+bwd at the DeiT-small shape: the run's metric."""
    att = sections.get("attention deit_small")
    if att is None:
        return None
    spread = round_ratios(
        find(att.rows, "multimax/auto"), find(att.rows, "softmax/sdpa"), "fwd_bwd"
    )
    return None if spread is None else spread.median


def run(cfg: DictConfig) -> float:
    """Measure every configured section, write the report and the run's ``results.json``;
    returns the headline ratio (lower is better; NaN when the DeiT-small shape is not run)."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    set_compile_policy(cfg.compile_policy)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = cfg.attention.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    bench = Bench(cfg, device, getattr(torch, dtype_name), make_multimax(cfg, device))
    measure_attention(bench, dtype_name)
    measure_scaling(bench, dtype_name)
    measure_output_layer(bench)
    measure_models(bench)
    path = write_report(
        cfg,
        device,
        bench.sections,
        bench.labels,
        bench.notes,
        bench.loads,
        time.perf_counter() - started,
    )
    print(path.read_text())
    print(f"[benchmark] wrote {path}")
    ratio = headline(bench.sections)
    value = float("nan") if ratio is None else ratio
    metrics = {
        f"{key}/{r.name}/{what}_ms": r.median_ms(what)
        for key, section in bench.sections.items()
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
            metric_value=value,
            steps=int(cfg.repeats),
            wall_seconds=time.perf_counter() - started,
            profile=str(cfg.profile.name) if "profile" in cfg else "paper",
            metrics=metrics,
        ),
        OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)),
    )
    return value

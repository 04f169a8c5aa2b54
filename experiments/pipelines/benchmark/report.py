"""The benchmark's report, ``results/speed_<cpu|gpu>.md``: the machine and load it ran on,
the targets with what was measured against them, the scaling table over the sequence length
and one table per section (median times, per-round ratios ``median [min–max]`` and peaks)."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from experiments.core.io import REPO_ROOT, atomic_write_text, git_commit
from experiments.pipelines.benchmark.timing import Row, Spread, peak_ratio, round_ratios


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


@dataclass
class Labels:
    """What the report calls things, filled in as sections are measured: attention shapes and
    output-layer cases by config name, section titles by section key."""

    shapes: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)


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


def _time(rows: list[Row], row: str, ref: str, what: str = "fwd_bwd") -> Spread | None:
    return round_ratios(find(rows, row), find(rows, ref), what)


def _peak(rows: list[Row], row: str, ref: str, what: str = "fwd_bwd") -> float | None:
    return peak_ratio(find(rows, row), find(rows, ref), what)


def targets(sections: dict[str, Section], cfg: DictConfig, labels: Labels) -> list[Target]:
    """The issue's targets, measured against the rows above (time: median [range] of the
    per-round ratios; memory: one measured peak over another)."""
    goal = cfg.targets

    def rows_of(key: str) -> list[Row]:
        return sections[key].rows if key in sections else []

    out = [
        Target(
            f"attention fwd+bwd time, {labels.shapes.get(shape, shape)}: multimax (auto) / "
            "SDPA softmax",
            _time(rows_of(f"attention {shape}"), "multimax/auto", "softmax/sdpa"),
            goal.attention_time,
        )
        for shape in ("deit_small", "lm")
    ]
    label = labels.shapes.get("lm", "lm")
    out += [
        Target(
            f"attention training peak memory, {label}: multimax (auto) / SDPA softmax",
            _peak(rows_of("attention lm"), "multimax/auto", "softmax/sdpa"),
            goal.attention_memory,
        ),
        Target(
            f"attention inference peak memory, {label}: multimax / SDPA softmax",
            _peak(rows_of("inference lm"), "multimax/inference", "softmax/sdpa", "fwd"),
            goal.attention_memory,
        ),
        Target(
            "anchor: authors' eager form / multimax (auto), fwd+bwd time, DeiT-small shape",
            _time(rows_of("attention deit_small"), "multimax/authors-eager", "multimax/auto"),
            goal.authors_anchor,
            below=False,
        ),
    ]
    for key, section in sections.items():
        if not key.startswith("output "):
            continue
        case = key.removeprefix("output ")
        label = labels.outputs.get(case, case)
        out += [
            Target(
                f"output layer time, {label}: fused / standard",
                _time(section.rows, "multimax/fused", "multimax/standard"),
                goal.output_time,
            ),
            Target(
                f"output layer peak memory, {label}: fused / standard",
                _peak(section.rows, "multimax/fused", "multimax/standard"),
                goal.output_memory,
            ),
        ]
    out.append(
        Target(
            "DeiT-small training step time: multimax / softmax",
            _time(rows_of("model deit_small"), "deit_small/multimax", "deit_small/softmax"),
            goal.deit_step,
        )
    )
    return out


def write_report(
    cfg: DictConfig,
    device: torch.device,
    sections: dict[str, Section],
    labels: Labels,
    notes: Sequence[str],
    loads: Sequence[tuple[float, float, float]],
    seconds: float,
) -> Path:
    """Write the report into ``cfg.out_dir`` (relative to the repository) and return its path."""
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
        *(t.line() for t in targets(sections, cfg, labels)),
        "",
    ]
    if any(key.startswith("scaling ") for key in sections):
        lines += [
            f"## Scaling with the sequence length: {labels.sections.get('scaling', 'causal')}",
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
        lines += [f"## {labels.sections.get(key, key)}", "", *table(section), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    name = f"speed_{'gpu' if device.type == 'cuda' else 'cpu'}.md"
    path = REPO_ROOT / cfg.out_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines))
    return path

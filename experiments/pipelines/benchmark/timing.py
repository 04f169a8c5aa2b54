"""How the benchmark measures: interleaved, seeded rounds of timing, then one peak-memory
call per row.

After ``warmup`` untimed runs (compiles happen there), each round times every row once, in
its own seeded order, so the rows of one round share the machine's load. A ratio is taken
within a round (a row's time over its reference row's time in that round) and summarised as
a :class:`Spread`, the median over the rounds with the range. Peak memory: on the CPU the
high-water mark of live bytes in torch's CPU allocator during one call, from
``torch.profiler`` memory events (inputs excluded); on a GPU
``torch.cuda.max_memory_allocated`` over the call.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated in torch's CPU allocator above the starting point while ``fn()``
    runs: the profiler's allocation events, summed in time order."""
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


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated above the starting point while ``fn()`` runs."""
    if device.type != "cuda":
        return cpu_peak_bytes(fn)
    _sync(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - start


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

"""The GPU check, for the day a CUDA device is lent: one command, under 8 minutes.

    python -m scripts.gpu_check [--budget-s 450] [--only paths,recompiles,...]

Runs each item in its own process, with a time limit, and prints one verdict per item
(PASS / FAIL / SKIP and one line):

* ``paths``: the attention path ``impl="auto"`` takes for every normaliser (training and
  inference; the promise: plain softmax on SDPA, MultiMax on FlexAttention), and every
  normaliser's automatic path equal to the reference (outputs and gradients, float32);
* ``recompiles``: torch._dynamo compilations while MultiMax attention (forward + backward)
  runs over batches of varying length, per mask kind;
* ``deit_small_bf16``: one bf16 DeiT-small training step with MultiMax attention through
  FlexAttention (``python -m experiments.vision experiment=deit_small_imagenet dry_run=true``);
* ``lm_fp16``: fairseq language-model updates in the recipe's precision, ``--fp16
  --fp16-no-flatten-grads`` (``python -m experiments.language_model
  experiment=lm_wikitext103 dry_run=true``; fairseq 0.12's ``--bf16`` runs on TPUs only);
* ``cuda_tests``: the test suite's CUDA tests (``scripts/gpu_check_pytest.py`` selects them);
* ``benchmark``: ``python -m experiments.benchmark`` in bfloat16, which writes
  ``results/speed_gpu.md``: attention against SDPA at the DeiT-small and LM shapes, the
  scaling over N = 256 … 4096 and the fused output layer (V = 50k and 267k) included.

The whole output goes to ``results/gpu_check/<UTC time>.txt``. Exit status: 0 when nothing
failed, 1 when an item failed, 2 (one line, nothing run) when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / "results" / "gpu_check"
SPEED_REPORT = REPO_ROOT / "results" / "speed_gpu.md"
DEFAULT_BUDGET_S = 450  # all items together: 7.5 minutes, under the promised 8
MIN_ITEM_S = 20  # an item with less time left than this is skipped, not started


@dataclass(frozen=True)
class Verdict:
    status: str  # PASS | FAIL | SKIP
    line: str

    def __str__(self) -> str:
        return f"{self.status} {self.line}"


@dataclass(frozen=True)
class Item:
    """One check: a command, its time limit, and how its (exit status, output) read."""

    name: str
    command: Sequence[str]
    timeout_s: int
    judge: Callable[[int, str], Verdict]
    needs: Sequence[str] = ()  # importable modules it needs; missing ones make it a SKIP


# --- judging an item's output ---------------------------------------------------------------


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def judge_by_status(rc: int, output: str) -> Verdict:
    """The in-process items: exit status 0 passes; their last line says what was found."""
    return Verdict("PASS" if rc == 0 else "FAIL", last_line(output))


def judge_pytest(rc: int, output: str) -> Verdict:
    """pytest's summary line, e.g. ``12 passed, 2 skipped, 300 deselected in 40.1s``."""
    summary = next(
        (
            line.strip(" =")
            for line in reversed(output.splitlines())
            if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)", line)
        ),
        last_line(output),
    )
    passed = re.search(r"(\d+) passed", summary)
    if rc == 5 or passed is None:
        return Verdict("FAIL", f"no CUDA test ran ({summary})")
    return Verdict("PASS" if rc == 0 else "FAIL", summary)


def judge_vision(rc: int, output: str) -> Verdict:
    if rc != 0:
        return Verdict("FAIL", f"exit status {rc}: {last_line(output)}")
    path = re.search(r"attention path ([\w, ]+)", output)
    step = re.search(r"step time:\s+(.+)", output)
    what = f"attention path {path.group(1) if path else '?'}, step {step.group(1) if step else '?'}"
    if path is None or path.group(1).strip() != "flex":
        return Verdict("FAIL", f"MultiMax did not run through flex: {what}")
    return Verdict("PASS", what)


def judge_lm(rc: int, output: str) -> Verdict:
    if rc != 0:
        return Verdict("FAIL", f"exit status {rc}: {last_line(output)}")
    command = next((ln for ln in output.splitlines() if "[dry run] fairseq-train" in ln), "")
    measured = re.search(r"measured:\s+(.+)", output)
    finite = "parameters finite after the steps: True" in output
    what = measured.group(1) if measured else last_line(output)
    if " --fp16" not in command or "--fp16-no-flatten-grads" not in command:
        return Verdict("FAIL", f"fairseq-train was not given the recipe's --fp16: {what}")
    if not finite:
        return Verdict("FAIL", f"parameters not finite after the fp16 steps: {what}")
    return Verdict("PASS", f"--fp16: {what}")


# Sections the benchmark must have written (issue 14: tiles against SDPA over N, the fused
# output layer against linear + cross-entropy), besides its targets.
BENCHMARK_SECTIONS = ("## Scaling with the sequence length", "## Output layer: σ + cross-entropy")


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def benchmark_judge(started: float) -> Callable[[int, str], Verdict]:
    def judge(rc: int, output: str) -> Verdict:
        if rc != 0:
            return Verdict("FAIL", f"exit status {rc}: {last_line(output)}")
        if not SPEED_REPORT.exists() or SPEED_REPORT.stat().st_mtime < started:
            return Verdict("FAIL", f"{_shown(SPEED_REPORT)} was not written")
        report = SPEED_REPORT.read_text()
        missing = [section for section in BENCHMARK_SECTIONS if section not in report]
        if missing:
            return Verdict("FAIL", f"{_shown(SPEED_REPORT)} lacks {', '.join(missing)}")
        targets = re.findall(r"^\| (.+?) \| .+ \| (yes|no|n/a) \|$", report, re.M)
        met = sum(verdict == "yes" for _, verdict in targets)
        unmet = [what for what, verdict in targets if verdict == "no"]
        line = f"{_shown(SPEED_REPORT)} written; targets met {met} of {len(targets)}"
        return Verdict("PASS", line + (f" (not met: {'; '.join(unmet)})" if unmet else ""))

    return judge


# --- the in-process items (run as `python -m scripts.gpu_check --item NAME`) ----------------


def expected_path(normalizer) -> str | None:
    """What the project promises for training on CUDA: stock softmax on SDPA, MultiMax-style
    σ normalisers on FlexAttention; None where nothing is promised."""
    from multimax.fused import pointwise_sigma
    from multimax.normalizers import Softmax

    if isinstance(normalizer, Softmax) and not normalizer.learn_temperature:
        return "sdpa"
    if pointwise_sigma(normalizer) is not None:
        return "flex"
    return None


def item_paths(
    device_name: str = "cuda", shape: tuple[int, int, int, int] = (2, 6, 197, 64)
) -> int:
    """Print every normaliser's automatic path (training / inference, bf16) and its error
    against the reference (float32, padding mask, outputs and q/k/v/σ gradients) at the
    DeiT-small attention shape (B, H, N, D)."""
    import torch

    import multimax
    from multimax.attention import AttentionInputs, select_path

    device = torch.device(device_name)
    torch.manual_seed(0)
    b, h, n, d = shape
    keep = torch.ones(b, 1, 1, n, dtype=torch.bool, device=device)
    keep[-1, ..., 3 * n // 4 :] = False  # the last sequence is padded
    failures, summary = [], []
    builds = {name: multimax.build_normalizer(name) for name in multimax.NORMALIZERS}
    builds["softmax_learned_T"] = multimax.build_normalizer("softmax", learn_temperature=True)
    for name, normalizer in builds.items():
        normalizer = normalizer.to(device)
        chosen = []
        for training in (True, False):
            q, k, v = (
                torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16).requires_grad_()
                for _ in range(3)
            )
            with torch.set_grad_enabled(training):
                inputs = AttentionInputs(
                    q=q,
                    k=k,
                    v=v,
                    normalizer=normalizer,
                    keep=None,
                    bias=None,
                    is_causal=False,
                    dropout_p=0.0,
                    scale=d**-0.5,
                )
                chosen.append(select_path(inputs))
        promised = expected_path(normalizer) if device.type == "cuda" else None
        if promised is not None and chosen[0] != promised:
            failures.append(f"{name} trains on {chosen[0]}, not {promised}")

        qkv = [torch.randn(b, h, n, d, device=device).requires_grad_() for _ in range(3)]
        grads = {}
        for impl in ("auto", "reference"):
            out = multimax.attention(*qkv, normalizer, mask=keep, impl=impl)
            wanted = [*qkv, *normalizer.parameters()]
            grads[impl] = (out, *torch.autograd.grad(out.square().sum(), wanted))
        error = max((a - r).abs().max().item() for a, r in zip(grads["auto"], grads["reference"]))
        scale = max(r.abs().max().item() for r in grads["reference"])
        if not error <= 1e-3 * max(scale, 1.0):
            failures.append(f"{name}: auto differs from the reference by {error:.2e}")
        print(
            f"{name:>12}: train {chosen[0]:<9} inference {chosen[1]:<9} "
            f"max |auto - reference| {error:.1e} (of {scale:.1e})"
        )
        summary.append(f"{name} {chosen[0]}/{chosen[1]}")
    print(("; ".join(failures) + " | " if failures else "") + ", ".join(summary))
    return 1 if failures else 0


def graphs_built() -> int:
    """Graphs torch._dynamo has built in this process so far (every compile and recompile)."""
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)


RECOMPILE_LENGTHS = (37, 45, 61, 64, 100, 128, 77, 50)  # a fairseq-like mix of batch lengths
SETTLED_AFTER = 2  # a static build at the first length, one with dynamic sizes at the second


def item_recompiles(
    device_name: str = "cuda", impl: str = "auto", batch: int = 8, heads: int = 8
) -> int:
    """Graphs built while MultiMax attention (forward + backward, bf16 on CUDA) runs over
    batches of the lengths above, for each mask kind; fails when lengths after the second
    still build graphs (a recompile per batch shape)."""
    import torch

    import multimax

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    normalizer = multimax.build_normalizer("multimax", order=2).to(device)
    b, h, d = batch, heads, 64
    lengths_in_batch = torch.linspace(0.5, 1.0, b, device=device)

    def padding(n: int) -> torch.Tensor:  # (B, 1, 1, N), True = keep: rows of varying length
        kept = (lengths_in_batch * n).ceil()
        return (torch.arange(n, device=device)[None, :] < kept[:, None])[:, None, None, :]

    kinds = {"padding": padding, "causal": None, "none": None}
    failures, summary = [], []
    for kind, make_mask in kinds.items():
        builds = []
        for n in RECOMPILE_LENGTHS:
            before = graphs_built()
            q, k, v = (
                torch.randn(b, h, n, d, device=device, dtype=dtype).requires_grad_()
                for _ in range(3)
            )
            mask = make_mask(n) if make_mask is not None else None
            out = multimax.attention(
                q, k, v, normalizer, mask=mask, is_causal=kind == "causal", impl=impl
            )
            out.float().square().mean().backward()
            builds.append(graphs_built() - before)
        late = sum(builds[SETTLED_AFTER:])
        print(
            f"{kind:>8} mask: graphs built per length "
            + ", ".join(f"{n}:{c}" for n, c in zip(RECOMPILE_LENGTHS, builds))
        )
        if late:
            failures.append(f"{kind} mask builds {late} graphs after length {SETTLED_AFTER}")
        summary.append(f"{kind} {sum(builds)}")
    print(
        ("recompiles per batch shape: " + "; ".join(failures) + " | " if failures else "")
        + f"graphs built over {len(RECOMPILE_LENGTHS)} lengths: "
        + ", ".join(summary)
        + f" (process total {graphs_built()})"
    )
    return 1 if failures else 0


IN_PROCESS_ITEMS = {"paths": item_paths, "recompiles": item_recompiles}


# --- the items and their runner -------------------------------------------------------------


def items(work_dir: Path, started: float) -> list[Item]:
    me = [sys.executable, "-m", "scripts.gpu_check", "--item"]
    run_dir = f"hydra.run.dir={work_dir}"
    return [
        Item("paths", [*me, "paths"], 90, judge_by_status, ("multimax",)),
        Item("recompiles", [*me, "recompiles"], 150, judge_by_status, ("multimax",)),
        Item(
            "deit_small_bf16",
            [
                sys.executable,
                "-m",
                "experiments.vision",
                "experiment=deit_small_imagenet",
                "dry_run=true",
                "normalizer=multimax",
                "trainer.amp=bfloat16",
                "logger=none",
                f"{run_dir}/vision",
            ],
            180,
            judge_vision,
            ("hydra", "timm"),
        ),
        Item(
            "lm_fp16",
            [
                sys.executable,
                "-m",
                "experiments.language_model",
                "experiment=lm_wikitext103",
                "dry_run=true",
                "normalizer=multimax",
                "train.precision=fp16",
                "train.update_freq=1",  # one micro-batch per update: the step, not the recipe
                "logger=none",
                f"{run_dir}/lm",
            ],
            180,
            judge_lm,
            ("hydra", "fairseq"),
        ),
        Item(
            "cuda_tests",
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "-p",
                "scripts.gpu_check_pytest",
                "tests",
            ],
            240,
            judge_pytest,
            ("pytest",),
        ),
        Item(
            "benchmark",
            [
                sys.executable,
                "-m",
                "experiments.benchmark",
                "attention.dtype=bfloat16",
                f"{run_dir}/benchmark",
            ],
            300,
            benchmark_judge(started),
            ("hydra",),
        ),
    ]


ITEM_NAMES = ("paths", "recompiles", "deit_small_bf16", "lm_fp16", "cuda_tests", "benchmark")


def missing_modules(names: Sequence[str]) -> list[str]:
    from importlib.util import find_spec

    return [name for name in names if find_spec(name) is None]


def run_command(command: Sequence[str], timeout_s: float) -> tuple[int, str, bool]:
    """(exit status, stdout + stderr, timed out) of ``command`` run from the repository root;
    on time-out its whole process group is stopped and the output so far kept."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, stopped whole on time-out
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        out.seek(0)
        return rc, out.read(), timed_out


class Log:
    """Everything the check prints, kept for ``results/gpu_check/``: written as it goes to a
    ``.partial`` file, renamed into place at the end."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self._file = self.partial.open("w")

    def write(self, text: str, echo: bool = False) -> None:
        self._file.write(text if text.endswith("\n") else text + "\n")
        self._file.flush()
        if echo:
            print(text, flush=True)

    def close(self) -> Path:
        self._file.close()
        os.replace(self.partial, self.path)
        return self.path


def run_items(checks: Sequence[Item], log: Log, budget_s: float) -> list[tuple[str, Verdict]]:
    """Run ``checks`` in order within ``budget_s`` seconds in all; one verdict each."""
    started = time.monotonic()
    verdicts = []
    for item in checks:
        left = budget_s - (time.monotonic() - started)
        missing = missing_modules(item.needs)
        log.write(f"\n===== {item.name}: {' '.join(item.command)}")
        if missing:
            verdict = Verdict("SKIP", f"not installed here: {', '.join(missing)}")
        elif left < MIN_ITEM_S:
            verdict = Verdict("SKIP", f"time budget spent ({budget_s:.0f} s; --budget-s)")
        else:
            limit = min(item.timeout_s, left)
            t0 = time.monotonic()
            rc, output, timed_out = run_command(item.command, limit)
            seconds = time.monotonic() - t0
            log.write(output)
            verdict = (
                Verdict("FAIL", f"stopped after {limit:.0f} s: {last_line(output)}")
                if timed_out
                else item.judge(rc, output)
            )
            verdict = Verdict(verdict.status, f"{verdict.line} [{seconds:.0f} s]")
        log.write(f"----- {item.name}: {verdict}")
        print(f"{item.name:>16}  {verdict}", flush=True)
        verdicts.append((item.name, verdict))
    return verdicts


def environment_lines() -> list[str]:
    import platform

    import torch

    props = torch.cuda.get_device_properties(0)
    return [
        f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
        f"{torch.cuda.device_count()} visible",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs",
        f"time: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
    ]


def cuda_missing() -> str | None:
    """Why this machine cannot run the check, in one line; None when it can."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible!r}"
        return (
            f"no CUDA device visible (torch {torch.__version__}, torch.cuda.is_available() is "
            f"False{where}): run this on a machine with an NVIDIA GPU"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--only", default="", help="comma-separated item names")
    parser.add_argument("--item", choices=sorted(IN_PROCESS_ITEMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    wanted = [name for name in args.only.split(",") if name] or list(ITEM_NAMES)
    unknown = sorted(set(wanted) - set(ITEM_NAMES))
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; items: {', '.join(ITEM_NAMES)}")
    why_not = cuda_missing()
    if why_not is not None:
        print(f"gpu_check: FAIL: {why_not}", file=sys.stderr)
        return 2
    if args.item:
        return IN_PROCESS_ITEMS[args.item]()

    started = time.time()
    stamp = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime(started))
    log = Log(OUT_DIR / f"{stamp}.txt")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        checks = [c for c in items(Path(work), started) if c.name in wanted]
        log.write("gpu_check: " + " | ".join(environment_lines()), echo=True)
        verdicts = run_items(checks, log, args.budget_s)
    failed = [name for name, v in verdicts if v.status == "FAIL"]
    total = time.time() - started
    log.write(
        f"\n{len(verdicts) - len(failed)} of {len(verdicts)} not failed in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    path = log.close()
    verdict = "FAIL" if failed else "PASS"
    print(f"gpu_check: {verdict} in {total:.0f} s; output in {path.relative_to(REPO_ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

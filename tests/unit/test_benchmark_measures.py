"""The benchmark's measures: ratios taken within rounds, targets judged on the median, the
authors' σ as the paper writes it, peak memory that sees real allocations, and report tables
that show what was measured."""

import torch
from omegaconf import OmegaConf

from experiments.core.io import REPO_ROOT
from experiments.pipelines.benchmark.baselines import authors_sigma
from experiments.pipelines.benchmark.report import Labels, Section, Target, table, targets
from experiments.pipelines.benchmark.timing import Row, Spread, peak_bytes, round_ratios
from multimax import build_normalizer


def test_ratios_are_taken_within_rounds_and_reported_as_median_and_range():
    """A load spike in one round slows every row of that round: the per-round ratio stays
    put, and the range shows the rounds' spread."""
    ref = Row("softmax/sdpa", "softmax", None, None)
    row = Row("multimax/auto", "multimax", None, None)
    ref.times["fwd"] = [1.0, 10.0, 1.0, 1.0, 2.0]
    row.times["fwd"] = [1.1, 11.0, 1.3, 1.0, 2.4]
    spread = round_ratios(row, ref, "fwd")
    assert spread == Spread(1.1, 1.0, 1.3)
    assert str(spread) == "1.10 [1.00–1.30]"
    assert Target("t", spread, 1.15).line() == "| t | 1.10 [1.00–1.30] | ≤ 1.15 | yes |"
    assert Target("t", spread, 1.05).line().endswith("| no |")  # judged on the median
    assert Target("m", 0.5, 0.3).line() == "| m | 0.50 | ≤ 0.3 | no |"


def _measured(name: str, kind: str, seconds: list[float], peak_mib: float) -> Row:
    row = Row(name, kind, None, None)
    row.times["fwd_bwd"] = seconds
    row.peak["fwd_bwd"] = peak_mib
    return row


def test_section_table_shows_median_times_round_ratios_and_peaks():
    sdpa = _measured("softmax/sdpa", "softmax", [0.010, 0.020, 0.010], 100.0)
    auto = _measured("multimax/auto", "multimax", [0.012, 0.022, 0.011], 80.0)
    lines = table(Section("attention lm", [sdpa, auto], "softmax/sdpa", ("fwd_bwd",)))
    assert lines[0] == "| row | what | fwd+bwd ms | fwd+bwd ×sdpa | peak MiB | peak ×sdpa |"
    assert lines[3] == "| multimax/auto |  | 12.0 | 1.10 [1.10–1.20] | 80.0 | 0.80 |"


def test_targets_name_the_measured_shapes_and_say_na_for_what_was_not_run():
    sdpa = _measured("softmax/sdpa", "softmax", [0.010, 0.010], 100.0)
    auto = _measured("multimax/auto", "multimax", [0.011, 0.012], 110.0)
    sections = {"attention lm": Section("attention lm", [sdpa, auto], "softmax/sdpa")}
    goals = {"attention_time": 1.15, "attention_memory": 1.25, "authors_anchor": 2.0,
             "output_time": 1.1, "output_memory": 0.3, "deit_step": 1.05}  # fmt: skip
    cfg = OmegaConf.create({"targets": goals})
    lines = [t.line() for t in targets(sections, cfg, Labels(shapes={"lm": "lm shape (N 8)"}))]
    assert "| attention fwd+bwd time, lm shape (N 8): multimax (auto) / SDPA softmax | " \
           "1.15 [1.10–1.20] | ≤ 1.15 | yes |" in lines  # fmt: skip
    assert any(line.startswith("| attention training peak memory, lm shape (N 8)") and
               "| 1.10 | ≤ 1.25 | yes |" in line for line in lines)  # fmt: skip
    assert lines[0].endswith("| n/a | ≤ 1.15 | n/a |")  # DeiT-small shape not measured


def test_readme_quotes_the_targets_of_the_committed_report():
    """README's speed table is the targets table of results/speed_cpu.md, row for row."""
    report = (REPO_ROOT / "results" / "speed_cpu.md").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Speed") : readme.index("## Mechanism study")]
    quoted = [line for line in section.splitlines() if line.startswith("| ")]
    targets_table = report[report.index("## Targets") :].split("\n## ")[0]
    assert quoted and all(line in targets_table.splitlines() for line in quoted)
    assert "median" in section and "load average" in section


def test_authors_sigma_is_the_formula():
    m = build_normalizer("multimax", order=2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(50)
    torch.testing.assert_close(authors_sigma(x, *m.sigma_parameters()), m.modulate(x))


def test_peak_bytes_measures_cpu_allocations():
    def allocate():
        a = torch.empty(4 * 2**20, dtype=torch.uint8)
        b = torch.empty(2 * 2**20, dtype=torch.uint8)
        del a, b

    peak = peak_bytes(allocate, torch.device("cpu"))
    assert 6 * 2**20 <= peak < 7 * 2**20

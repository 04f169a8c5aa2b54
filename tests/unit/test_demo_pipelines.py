"""``make demo``'s parts in-process: its pipelines come from the experiment registry, a
missing app is skipped, and the README's smoke table follows results/smoke's CSV files."""

from __future__ import annotations

from pathlib import Path

from experiments.core import registry
from experiments.pipelines import demo


def test_pipelines_are_the_registry_demo_entries_in_table_order() -> None:
    found = demo.pipelines()
    assert [p.key for p in found] == ["vision", "lm", "mt", "mechanism"]
    by_key = {e.demo_key: e for e in registry.experiments().values() if e.demo_key}
    for p in found:
        e = by_key[p.key]
        assert p.module == f"experiments.{e.app}" and p.title == e.demo_title
        assert p.overrides == (f"experiment={e.name}", "profile=smoke")
        assert p.entry_point.exists()


def test_missing_entry_point_is_skipped_with_a_message(tmp_path: Path, monkeypatch, capsys) -> None:
    ghost = demo.Pipeline("ghost", "not written yet", "experiments.ghost_pipeline", ())
    monkeypatch.setattr(demo, "pipelines", lambda: (ghost,))
    code = demo.main(["--pipelines", "ghost", "--runs-dir", str(tmp_path / "r"), "--out",
                      str(tmp_path / "o"), "--no-simplex"])  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out
    assert "skipping ghost: experiments/ghost_pipeline.py is not in this checkout yet" in stdout
    assert "skipped: ghost" in (tmp_path / "o" / "README.md").read_text()


def test_smoke_table_has_a_row_per_pipeline_and_a_column_per_normaliser(tmp_path: Path) -> None:
    header = "profile,model,dataset,normalizer,output_normalizer,metric_name,mean,std,n,seeds\n"
    (tmp_path / "mechanism_smoke.csv").write_text(
        header + "smoke,att,retrieval,softmax,none,task_error,0.8333,,1,0\n"
        "smoke,att,retrieval,multimax(order=1),none,task_error,0.5,,1,0\n"
    )
    (tmp_path / "imagenet_top1_smoke.csv").write_text(
        header + "smoke,deit,digits,softmax,multimax,top1,88.0555,,1,0\n"
    )
    lines = demo.smoke_table(tmp_path).splitlines()
    assert lines == [
        "| pipeline (smoke data) | metric | softmax/multimax | softmax | multimax(order=1) |",
        "|---|---|---|---|---|",
        "| deit (digits) | top1 | 88.06 | — | — |",
        "| att (retrieval) | task_error | — | 0.833 | 0.500 |",
    ]

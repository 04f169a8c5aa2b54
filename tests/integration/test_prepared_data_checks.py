"""Prepared fairseq data is checked before it is used: ``PREPARED.json`` records every file's
size and SHA-256; the cheap check (sizes, each index against its ``.bin``) runs before every
run, the full one (checksums too) on demand; a preparation killed at any point leaves no
process and no build folder behind. Real ``fairseq-preprocess`` on a tiny generated corpus."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest

from experiments.pipelines.fairseq import corpora as dc
from tests.apps import Background, run, wait_dead

BIN = "smoke/wikitext103-bin"
REBUILD = "python -m scripts.prepare_wikitext103 --smoke root="


def _cfg(root):
    items = [f"root={root}", "corpus.generate.n_train=40", "corpus.generate.n_valid=8"]
    return dc.load_data_config("wikitext103_smoke", [*items, "corpus.generate.n_test=8"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    dc.prepare(_cfg(root))
    return root


@pytest.fixture
def copy(prepared, tmp_path):
    """A copy of the prepared data to damage, and its config."""
    shutil.copytree(prepared / BIN, tmp_path / BIN)
    return tmp_path / BIN, _cfg(tmp_path)


def test_the_record_holds_every_file_with_its_size_and_checksum(prepared):
    folder = prepared / BIN
    files = json.loads((folder / dc.PREPARED_FILE).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir() if p.name != dc.PREPARED_FILE}
    assert set(files) == on_disk and {"train.bin", "train.idx", "test.bin"} <= on_disk
    assert files["train.bin"]["bytes"] == (folder / "train.bin").stat().st_size
    assert files["train.bin"]["sha256"] == dc.sha256_of(folder / "train.bin")
    assert f"all {len(files)} files match {dc.PREPARED_FILE}" in dc.verify(_cfg(prepared))


@pytest.mark.parametrize("name", ["train.bin", "train.idx", "test.bin"])
def test_a_cut_file_is_found_before_the_run_and_named_with_the_rebuild_command(copy, name):
    folder, cfg = copy
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    assert not dc.is_prepared(cfg)
    with pytest.raises(dc.DamagedDataError) as err:
        dc.require_prepared(cfg)
    message = str(err.value)
    assert "\n" not in message and str(folder / name) in message
    assert f"rebuild it with: {REBUILD}{folder.parents[1]}" in message


def test_an_index_that_disagrees_with_its_data_is_found_without_a_record(copy):
    folder, cfg = copy
    record = json.loads((folder / dc.PREPARED_FILE).read_text())
    del record["files"]  # a build recorded before file sizes were
    (folder / dc.PREPARED_FILE).write_text(json.dumps(record))
    assert dc.is_prepared(cfg)
    with (folder / "valid.bin").open("ab") as f:
        f.write(b"\0\0")
    assert dc.index_problem(folder / "valid.idx").startswith(f"{folder / 'valid.bin'} has ")
    assert not dc.is_prepared(cfg)


def test_changed_content_of_the_same_size_needs_the_full_check(copy):
    folder, cfg = copy
    data = bytearray((folder / "test.bin").read_bytes())
    data[0] ^= 0xFF
    (folder / "test.bin").write_bytes(bytes(data))
    assert dc.is_prepared(cfg) and not dc.is_prepared(cfg, full=True)
    with pytest.raises(dc.DamagedDataError, match="test.bin has other content"):
        dc.verify(cfg)


def test_verify_on_the_command_line_names_the_damage(copy, capsys):
    folder, cfg = copy
    (folder / "train.bin").write_bytes(b"")
    args = ["--verify", "--smoke", f"root={folder.parents[1]}", "corpus.generate.n_train=40"]
    args += ["corpus.generate.n_valid=8", "corpus.generate.n_test=8"]
    with pytest.raises(SystemExit, match="train.bin has 0 bytes, .* rebuild it with: python"):
        dc.main("wikitext103", "wikitext103_smoke", args)


def test_an_abandoned_build_folder_goes_and_a_live_one_stays(tmp_path):
    cfg = _cfg(tmp_path)
    abandoned = tmp_path / "smoke/.wikitext103-bin.build999999999"
    (abandoned / "text").mkdir(parents=True)
    live = dc.new_build_dir(cfg)  # locked by this process while it builds
    try:
        assert not abandoned.exists() and live.is_dir()
        dc.remove_abandoned_builds(cfg)
        assert live.is_dir()
    finally:
        dc._release_build(live)
    dc.remove_abandoned_builds(cfg)
    assert not list(tmp_path.glob("smoke/.wikitext103-bin.*"))


@pytest.mark.slow
def test_the_prepare_command_rebuilds_damaged_data_and_verify_says_so(copy):
    folder, cfg = copy
    (folder / "train.bin").write_bytes(b"")
    script = [sys.executable, "-m", "scripts.prepare_wikitext103", "--smoke"]
    args = [f"root={folder.parents[1]}", "corpus.generate.n_train=40"]
    args += ["corpus.generate.n_valid=8", "corpus.generate.n_test=8"]
    damaged = run([*script, "--verify", *args])
    assert damaged.returncode == 1 and "train.bin has 0 bytes" in damaged.stderr
    rebuilt = run([*script, *args])
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilding" in rebuilt.stderr and dc.is_prepared(cfg, full=True)
    checked = run([*script, "--verify", *args])
    assert checked.returncode == 0 and "files match PREPARED.json" in checked.stdout


@pytest.mark.slow
def test_a_preparation_killed_in_fairseq_preprocess_leaves_nothing_behind(tmp_path):
    script = [sys.executable, "-m", "scripts.prepare_wikitext103", "--smoke", f"root={tmp_path}"]
    bg = Background([*script, "corpus.generate.n_train=40"])
    deadline = time.monotonic() + 120
    children: list[int] = []
    while not children and time.monotonic() < deadline and bg.proc.poll() is None:
        children = bg.children()  # fairseq-preprocess' process, started after the text files
        time.sleep(0.05)
    assert children, f"fairseq-preprocess never started:\n{bg.output}"
    bg.kill(group=False)  # the preparing process alone, as a scheduler's SIGKILL would
    assert wait_dead(children) == [], "fairseq-preprocess outlived the preparation"
    assert list(tmp_path.glob("smoke/.wikitext103-bin.build*"))  # what the kill left
    dc.prepare(_cfg(tmp_path))
    assert dc.is_prepared(_cfg(tmp_path))
    assert not list(tmp_path.glob("smoke/.wikitext103-bin.*"))  # build folder and lock gone

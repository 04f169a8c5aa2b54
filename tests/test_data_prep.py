"""Data preparation for the fairseq pipelines: tokeniser, BPE, datasets -> fairseq-preprocess,
caching, missing corpora. Everything on tiny local data made here (nothing downloads)."""

from __future__ import annotations

import json
import time

import pytest

from experiments.data import fairseq_corpora as dc
from experiments.data.smoke_corpora import lm_recall, mt_reorder

# --- tokeniser ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "lang", "tokens"),
    [
        ("Hello, world!", "en", "Hello , world !"),
        ("I don't know.", "en", "I don 't know ."),
        ("It costs 1,000.50 dollars (roughly).", "en", "It costs 1,000.50 dollars ( roughly ) ."),
        ("Das ist z.B. gut.", "de", "Das ist z.B. gut ."),
        ("Ein Café-Liebhaber?", "de", "Ein Café-Liebhaber ?"),
        ("the U.S. army", "en", "the U.S. army"),
    ],
)
def test_tokenize_moses_rules(text, lang, tokens):
    assert dc.tokenize(text, lang) == tokens


def test_tokenize_aggressive_dash_and_detokenize_round_trip():
    tok = dc.tokenize("Ein Café-Liebhaber, oder?", "de", aggressive_dash=True)
    assert tok == "Ein Café @-@ Liebhaber , oder ?"
    for text, lang in [
        ("Hello, world! I don't know (really) what this means.", "en"),
        ('He said "yes" and left: 3.5 km.', "en"),
        ("Ein Café-Liebhaber, oder? Ja: 3.5 Euro.", "de"),
    ]:
        assert dc.detokenize(dc.tokenize(text, lang, aggressive_dash=True), lang) == text


def test_clean_pairs_applies_length_and_ratio_limits():
    pairs = [("a b", "c d"), ("a", "b c d e"), ("", "x"), (" ".join("a" * 9), "b")]
    assert list(dc.clean_pairs(pairs, 1, 5, 1.5)) == [("a b", "c d")]


# --- BPE --------------------------------------------------------------------------------------------


def test_learn_bpe_merges_most_frequent_pairs_first():
    lines = ["low lower lowest", "newer wider new", "low low low newest"] * 10
    merges = dc.learn_bpe(lines, 5)
    assert merges[0] == ("l", "o") and merges[1] == ("lo", "w</w>")
    assert len(merges) == 5


def test_bpe_apply_and_remove_round_trip(tmp_path):
    lines = ["the understanding of understanding", "under the stand"] * 20
    merges = dc.learn_bpe(lines, 30)
    dc.write_bpe_codes(merges, tmp_path / "code")
    assert dc.read_bpe_codes(tmp_path / "code") == merges
    bpe = dc.BPE(merges)
    for line in ["the understanding", "unseen words stay splittable", "x"]:
        segmented = bpe(line)
        assert dc.remove_bpe(segmented) == line
        assert all(piece for piece in segmented.split())
    assert "@@" in bpe("unseen")  # characters of an unseen word, joined by @@


def test_learn_bpe_stops_below_min_frequency():
    assert dc.learn_bpe(["a b c d"], 100) == []  # every pair occurs once


# --- the pipelines on tiny local data -----------------------------------------------------------------


def _lm_cfg(root, **over):
    items = [f"root={root}", "corpus.generate.n_train=60", "corpus.generate.n_valid=10"]
    items += ["corpus.generate.n_test=10", *[f"{k}={v}" for k, v in over.items()]]
    return dc.load_data_config("wikitext103_smoke", items)


def test_language_model_prep_binarises_and_skips_when_done(tmp_path, capsys):
    cfg = _lm_cfg(tmp_path)
    dest = dc.prepare(cfg)
    assert (dest / "dict.txt").exists() and (dest / "train.bin").exists()
    assert (dest / "test.idx").exists() and dc.is_prepared(cfg)
    info = json.loads((dest / dc.PREPARED_FILE).read_text())
    assert info["stats"]["train_lines"] == 62  # header + blank line + 60 paragraphs
    mtime = (dest / "train.bin").stat().st_mtime
    time.sleep(0.01)
    dc.prepare(cfg)
    assert (dest / "train.bin").stat().st_mtime == mtime
    assert "already prepared" in capsys.readouterr().err
    assert not list(tmp_path.glob("smoke/.*build*"))  # no half-built folders left


def test_changed_settings_rebuild(tmp_path):
    cfg = _lm_cfg(tmp_path)
    dc.prepare(cfg)
    changed = _lm_cfg(tmp_path, **{"corpus.generate.n_train": 70})
    assert not dc.is_prepared(changed)
    dc.prepare(changed)
    info = json.loads((tmp_path / "smoke/wikitext103-bin" / dc.PREPARED_FILE).read_text())
    assert info["stats"]["train_lines"] == 72


def test_local_wikitext_copy_through_datasets(tmp_path):
    """A user's local copy (wiki.*.tokens) is read with datasets' text builder."""
    copy = tmp_path / "copy"
    lm_recall(copy, 20, 5, 5, seed=3)
    cfg = dc.load_data_config("wikitext103", [f"root={tmp_path}", f"corpus.local_path={copy}"])
    dest = dc.prepare(cfg)
    assert dest == tmp_path / "wikitext-103"
    vocab = (dest / "dict.txt").read_text().split()
    assert "query" in vocab and "facts" in vocab


def test_translation_prep_follows_the_iwslt_recipe(tmp_path):
    """Local JSON-lines copy, valid = every 23rd training pair, lowercase, joint BPE, raw refs."""
    copy = tmp_path / "copy"
    mt_reorder(copy, 230, 5, 12, seed=5)
    (copy / "validation.jsonl").unlink()  # the IWSLT recipe derives valid from train
    cfg = dc.load_data_config(
        "iwslt14_deen",
        [f"root={tmp_path}", f"corpus.local_path={copy}", "recipe.bpe_symbols=60", "workers=1"],
    )
    dest = dc.prepare(cfg)
    stats = json.loads((dest / dc.PREPARED_FILE).read_text())["stats"]
    assert stats == {"train_pairs": 220, "valid_pairs": 10, "test_pairs": 12}
    for name in ("train.de-en.de.bin", "valid.de-en.en.idx", "dict.de.txt", "dict.en.txt", "code"):
        assert (dest / name).exists(), name
    train_en = (dest / "text/train.en").read_text()
    assert train_en == train_en.lower() and "@@ " in train_en
    refs = (dest / "test.raw.en").read_text().splitlines()
    raw = [json.loads(line)["translation"]["en"] for line in (copy / "test.jsonl").open()]
    assert refs == [r.lower() for r in raw]  # untokenised, lowercased as the recipe


def test_save_to_disk_copy_and_joined_dictionary(tmp_path):
    """A ``datasets.save_to_disk`` folder is read with load_from_disk (WMT: joined dict)."""
    import datasets

    rows = [
        {"translation": {"en": f"the cat {i % 5} sat .", "de": f"die katze {i % 5} sass ."}}
        for i in range(30)
    ]
    ds = datasets.Dataset.from_list(rows)
    copy = tmp_path / "copy"
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(copy))
    cfg = dc.load_data_config(
        "wmt14_ende",
        [f"root={tmp_path}", f"corpus.local_path={copy}", "recipe.bpe_symbols=20", "workers=1"],
    )
    dest = dc.prepare(cfg)
    assert (dest / "dict.en.txt").read_text() == (dest / "dict.de.txt").read_text()
    assert (dest / "test.raw.de").read_text().splitlines()[0] == "die katze 0 sass ."


def test_missing_corpus_names_the_prepare_command(tmp_path):
    cfg = dc.load_data_config("iwslt14_deen", [f"root={tmp_path}"])
    with pytest.raises(dc.MissingCorpusError, match="python -m scripts.prepare_iwslt14"):
        dc.require_prepared(cfg)
    cfg = dc.load_data_config("wikitext103", [f"root={tmp_path}", "corpus.local_path=/nope"])
    with pytest.raises(dc.MissingCorpusError, match="/nope"):
        dc.prepare(cfg)


def test_prepare_script_cli(tmp_path, capsys):
    dc.main(
        "wikitext103",
        "wikitext103_smoke",
        ["--smoke", f"root={tmp_path}", "corpus.generate.n_train=20"],
    )
    assert str(tmp_path / "smoke/wikitext103-bin") in capsys.readouterr().out
    with pytest.raises(SystemExit, match="nope does not exist"):
        dc.main("wikitext103", "wikitext103_smoke", [f"root={tmp_path}", "corpus.local_path=/nope"])

"""Data preparation for the fairseq pipelines: corpora in the formats the configs name ->
fairseq's recipes (sacremoses, subword-nmt) -> fairseq-preprocess, caching, missing corpora,
the layout of the data code. Everything on tiny local data made here (nothing downloads)."""

from __future__ import annotations

import json
import time

import pytest

from experiments.pipelines.fairseq import corpora as dc

DE_EN, EN_DE, SPLIT_NAMES = ("de", "en"), ("en", "de"), ("train", "valid", "test")

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


# --- the real formats the configs name, in files the tests write ----------------------------------


def _write_wikitext(folder, n: int) -> dict[str, list[str]]:
    """``wiki.{train,valid,test}.tokens`` as the release has them: `` = Title = `` headings,
    blank lines, tokenised paragraphs with ``<unk>`` and `` @-@ `` / `` @,@ `` splits."""
    folder.mkdir(parents=True)
    out = {}
    for split in ("train", "valid", "test"):
        lines = []
        for i in range(n):
            lines += [
                f" = Record {i} = ",
                " ",
                f" The <unk> {i} is a role @-@ playing game of 1 @,@ 00{i % 10} levels , "
                f"released by <unk> in 19{i % 90 + 10} . ",
                " ",
            ]
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[split] = lines
    return out


def test_wikitext_release_files_keep_unk_and_at_splits(tmp_path):
    """WikiText-103's own token files are binarised line for line; ``<unk>`` becomes
    fairseq's unknown symbol (not a word of the dictionary), ``@-@`` stays a token."""
    from fairseq.data import Dictionary, data_utils

    copy = tmp_path / "wikitext-103-raw"
    written = _write_wikitext(copy, 6)
    cfg = dc.load_data_config("wikitext103", [f"root={tmp_path}", f"corpus.local_path={copy}"])
    dest = dc.prepare(cfg)
    vocab = [line.split()[0] for line in (dest / "dict.txt").read_text().splitlines()]
    assert "@-@" in vocab and "@,@" in vocab and "<unk>" not in vocab
    dictionary = Dictionary.load(str(dest / "dict.txt"))
    test = data_utils.load_indexed_dataset(str(dest / "test"), dictionary)
    assert len(test) == len(written["test"])
    decoded = [dictionary.string(test[i]) for i in range(len(test))]
    assert decoded == [" ".join(line.split()) for line in written["test"]]
    assert dictionary.unk() in test[2].tolist()


DE = [
    "Er sagt: „Das ist z.B. {n}.000,50 € wert“ – oder?",
    "Das Café-Haus Nr. {n} ist geschlossen.",
    "Frau Dr. Müller’s Hund & die Katze | {n} mal.",
    "Wir haben {n} Äpfel (rote) gekauft...",
    "<b>Heute</b> ist der {n}. Tag!",
    "Sie sagt\u00a0: ''nein'' – {n}",
    "Null\u200bbreite {n} und Steuer\x07zeichen.",
]
EN = [
    "He says: “This is e.g. worth {n},000.50 €” – or?",
    "The coffee-house No. {n} is closed.",
    "Mrs. Dr. Müller’s dog & the cat | {n} times.",
    "We bought {n} apples (red ones)...",
    "<b>Today</b> is day {n}!",
    "She says\u00a0: ''no'' – {n}",
    "Zero\u200bwidth {n} and control\x07chars.",
]
# Pairs that clean-corpus-n drops: a length ratio above 1.5, an empty side, 200 tokens.
DROPPED = [("Ja.", "Yes, of course, my friend, yes, yes."), ("", "Nothing."),
           (" ".join(["Wort"] * 200), " ".join(["word"] * 200))]  # fmt: skip


def _parallel(n: int, offset: int = 0, dropped: bool = True) -> list[dict]:
    rows = [
        {"de": DE[i % len(DE)].format(n=i + offset), "en": EN[i % len(EN)].format(n=i + offset)}
        for i in range(n)
    ]
    for i, (de, en) in enumerate(DROPPED if dropped else ()):
        rows[5 + 40 * i] = {"de": de, "en": en}
    return rows


def _write_parquet(path, rows: list[dict]) -> None:
    """A Parquet file of the hub's translation datasets: one ``translation`` struct column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"translation": rows}), path)


def _moses(lines: list[str], lang: str, dash: bool) -> list[str]:
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(x, aggressive_dash_splits=dash, return_str=True) for x in lines]


def _keep(src: list[str], tgt: list[str], max_len: int) -> list[int]:
    """Indices clean-corpus-n keeps (ratio 1.5) on text that is already single-spaced."""
    kept = []
    for i, (s, t) in enumerate(zip(src, tgt)):
        ns, nt = len(s.split()), len(t.split())
        if 1 <= ns <= max_len and 1 <= nt <= max_len and max(ns / nt, nt / ns) <= 1.5:
            kept.append(i)
    return kept


def _subword_nmt(work, train: list[str], merges: int, files: dict) -> tuple[str, dict]:
    """``learn_bpe.py -s MERGES < train > code`` and ``apply_bpe.py -c code < f`` as the
    recipes run them (subword-nmt's own command lines)."""
    import subprocess
    import sys

    work.mkdir(parents=True, exist_ok=True)
    learn = [sys.executable, "-m", "subword_nmt.learn_bpe", "-s", str(merges)]
    code = subprocess.run(
        learn, input="\n".join(train) + "\n", capture_output=True, text=True, check=True
    ).stdout
    (work / "code").write_text(code, encoding="utf-8")
    apply = [sys.executable, "-m", "subword_nmt.apply_bpe", "-c", str(work / "code")]
    out = {}
    for name, lines in files.items():
        text = "\n".join(lines) + "\n"
        out[name] = subprocess.run(
            apply, input=text, capture_output=True, text=True, check=True
        ).stdout.split("\n")[:-1]
    return code, out


def _prepared_text(dest, name: str) -> list[str]:
    return dc.read_lines(dest / "text" / name)


def test_iwslt_prep_equals_sacremoses_and_subword_nmt(tmp_path):
    """prepare-iwslt14.sh on the hub's Parquet layout: every prepared file equals what
    sacremoses and subword-nmt give when called directly with the recipe's settings."""
    train, test = _parallel(240), _parallel(12, offset=1000, dropped=False)
    copy = tmp_path / "iwslt14-de-en"
    _write_parquet(copy / "de-en/train/0000.parquet", train)
    _write_parquet(copy / "de-en/test/0000.parquet", test)
    cfg = dc.load_data_config(
        "iwslt14_deen", [f"root={tmp_path}", f"corpus.local_path={copy}", "workers=1"]
    )
    dest = dc.prepare(cfg)

    tok = {lang: _moses([r[lang].strip() for r in train], lang, dash=False) for lang in DE_EN}
    keep = _keep(tok["de"], tok["en"], 175)
    assert len(keep) == len(train) - len(DROPPED)
    clean = {lang: [tok[lang][i].lower() for i in keep] for lang in DE_EN}
    split = {
        lang: {
            "train": [x for n, x in enumerate(clean[lang], 1) if n % 23],
            "valid": [x for n, x in enumerate(clean[lang], 1) if n % 23 == 0],
            "test": [
                x.lower() for x in _moses([r[lang].replace("’", "'") for r in test], lang, False)
            ],
        }
        for lang in DE_EN
    }
    files = {f"{s}.{lang}": split[lang][s] for lang in DE_EN for s in SPLIT_NAMES}
    code, expected = _subword_nmt(
        tmp_path / "by_hand", split["de"]["train"] + split["en"]["train"], 10_000, files
    )
    assert (dest / "code").read_text(encoding="utf-8") == code
    for name, lines in expected.items():
        assert _prepared_text(dest, name) == lines, name
        assert [dc.tt.remove_bpe(x) for x in lines] == _prepared_text(dest, f"tok.{name}")
    assert any("&apos;" in x for x in expected["train.en"])  # Moses' XML escaping kept
    assert any("@@ " in x for x in expected["train.de"])
    raw = dc.read_lines(dest / "test.raw.en")
    assert raw == [r["en"].strip().lower() for r in test]
    stats = json.loads((dest / dc.PREPARED_FILE).read_text())["stats"]
    assert stats["train_pairs"] == len(split["de"]["train"]) and stats["test_pairs"] == 12
    assert (dest / "train.de-en.de.bin").exists() and (dest / "dict.en.txt").exists()


def test_wmt_prep_equals_sacremoses_and_subword_nmt(tmp_path):
    """prepare-wmt14en2de.sh --icml17 on the hub's Parquet layout, checked the same way."""
    import regex
    from sacremoses import MosesPunctNormalizer

    train, test = _parallel(230), _parallel(12, offset=1000, dropped=False)
    copy = tmp_path / "wmt14"
    _write_parquet(copy / "de-en/train-00000-of-00001.parquet", train)
    _write_parquet(copy / "de-en/test-00000-of-00001.parquet", test)
    cfg = dc.load_data_config(
        "wmt14_ende",
        [f"root={tmp_path}", f"corpus.local_path={copy}", "workers=1", "recipe.keep_text=true"],
    )
    dest = dc.prepare(cfg)

    def train_side(lang: str) -> list[str]:
        norm = MosesPunctNormalizer(lang=lang, perl_parity=True)
        lines = [regex.sub(r"\p{C}", " ", norm.normalize(r[lang].strip())) for r in train]
        return _moses(lines, lang, dash=True)

    tok = {lang: train_side(lang) for lang in EN_DE}
    held = {lang: _moses([r[lang].replace("’", "'") for r in test], lang, True) for lang in EN_DE}
    split = {
        lang: {
            "train": [x for n, x in enumerate(tok[lang], 1) if n % 100],
            "valid": [x for n, x in enumerate(tok[lang], 1) if n % 100 == 0],
            "test": held[lang],
        }
        for lang in EN_DE
    }
    files = {f"{s}.{lang}": split[lang][s] for lang in EN_DE for s in SPLIT_NAMES}
    code, bpe = _subword_nmt(
        tmp_path / "by_hand", split["en"]["train"] + split["de"]["train"], 40_000, files
    )
    assert (dest / "code").read_text(encoding="utf-8") == code
    for s in ("train", "valid"):  # clean-corpus-n 1..250 after BPE
        keep = _keep(bpe[f"{s}.en"], bpe[f"{s}.de"], 250)
        assert len(keep) < len(bpe[f"{s}.en"]) or s == "valid"
        for lang in EN_DE:
            assert _prepared_text(dest, f"{s}.{lang}") == [bpe[f"{s}.{lang}"][i] for i in keep]
    for lang in EN_DE:
        assert _prepared_text(dest, f"test.{lang}") == bpe[f"test.{lang}"]
    assert any("@-@" in x for x in split["en"]["train"])  # tokenizer.perl -a
    assert not any("“" in x or "\u200b" in x for x in split["en"]["train"])  # normalised
    assert (dest / "dict.en.txt").read_text() == (dest / "dict.de.txt").read_text()


def test_tool_versions_are_part_of_the_fingerprint(tmp_path, monkeypatch):
    """Data prepared by another sacremoses / subword-nmt counts as not prepared."""
    cfg = dc.load_data_config("iwslt14_deen_smoke", [f"root={tmp_path}"])
    lm = dc.load_data_config("wikitext103_smoke", [f"root={tmp_path}"])
    before, before_lm = dc.fingerprint(cfg), dc.fingerprint(lm)
    real = dc.metadata.version
    monkeypatch.setattr(
        dc.metadata, "version", lambda name: "9.9" if name == "sacremoses" else real(name)
    )
    assert dc.fingerprint(cfg) != before and dc.fingerprint(lm) == before_lm


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

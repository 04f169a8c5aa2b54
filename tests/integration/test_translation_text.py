"""experiments/pipelines/fairseq/translation_text.py: the recipe steps are sacremoses' and subword-nmt's,
the scores are fairseq's (checked against fairseq's own ``fairseq-score`` and Moses decoder)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experiments.pipelines.fairseq import evaluate as fairseq_evaluate
from experiments.pipelines.fairseq import translation_text as tt


def test_tokenize_is_moses_with_xml_escaping():
    assert tt.tokenize("I don't know & you?", "en") == "I don &apos;t know &amp; you ?"
    assert tt.tokenize("Ein Café-Liebhaber | z.B. hier.", "de") == (
        "Ein Café-Liebhaber &#124; z.B. hier ."
    )
    assert tt.tokenize("Ein Café-Liebhaber.", "de", aggressive_dash=True) == (
        "Ein Café @-@ Liebhaber ."
    )


def test_detokenize_inverts_the_tokeniser_as_fairseq_moses_decodes():
    """Our test-time detokeniser is the one ``--eval-bleu-detok moses`` uses in validation."""
    from fairseq.data.encoders.moses_tokenizer import MosesTokenizer, MosesTokenizerConfig

    fairseq_moses = MosesTokenizer(MosesTokenizerConfig(source_lang="de", target_lang="en"))
    for text, lang in [
        ("Hello, world! I don't know (really) what this means.", "en"),
        ('He said "yes" & left: 3.5 km.', "en"),
        ("Ein Café-Liebhaber, oder? Ja: 3,5 Euro.", "de"),
    ]:
        tokens = tt.tokenize(text, lang, aggressive_dash=True)
        assert tt.detokenize(tokens, lang) == text
        if lang == "en":
            assert fairseq_moses.decode(tokens) == tt.detokenize(tokens, lang)


def test_punctuation_normaliser_and_non_printing_characters():
    assert tt.normalize_punctuation("„Hallo“ – sagte er…", "de") == '"Hallo" - sagte er...'
    assert tt.remove_non_printing_char("a\u200bb\x07c") == "a b c"  # Cf and Cc -> space
    assert tt.straighten_apostrophes("it’s") == "it's"


def test_clean_corpus_follows_clean_corpus_n():
    pairs = [
        ("a  b ", " c d"),  # kept, whitespace normalised
        ("a", "b c"),  # ratio 2 > 1.5
        ("", "x"),  # empty side
        (" ".join("a" * 6), "b " * 6),  # 6 words > max 5
        ("a|b c", "d e"),  # pipes removed (the first pair is not factored)
        ("x" * 11, "y"),  # a word longer than max_word_length
    ]
    kept = list(tt.clean_corpus(pairs, 1, 5, 1.5, max_word_length=10))
    assert kept == [("a b", "c d"), ("ab c", "d e")]


def test_bpe_codes_round_trip(tmp_path):
    """Codes learnt by subword-nmt, applied, and ``remove_bpe`` gives the tokens back."""
    lines = ["the understanding of understanding", "under the stand", "new words , newer"] * 20
    train = tmp_path / "train"
    train.write_text("\n".join(lines) + "\n")
    tt.learn_bpe(train, tmp_path / "code", 20)
    codes = (tmp_path / "code").read_text().splitlines()
    assert codes[0] == "#version: 0.2" and len(codes) == 21
    held_out = ["the understanding", "unseen words stay splittable", "x"]
    (tmp_path / "test").write_text("\n".join(held_out) + "\n")
    tt.apply_bpe(tmp_path / "code", tmp_path / "test", tmp_path / "test.bpe")
    segmented = (tmp_path / "test.bpe").read_text().splitlines()
    assert "@@ " in segmented[1]
    assert [tt.remove_bpe(s) for s in segmented] == held_out


def _fairseq_score(tmp_path, hyps: list[str], refs: list[str]) -> float:
    """BLEU4 printed by fairseq's own ``fairseq-score --sys --ref``."""
    (tmp_path / "sys").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref").write_text("\n".join(refs) + "\n")
    cmd = [sys.executable, "-m", "fairseq_cli.score", "--sys", str(tmp_path / "sys")]
    out = subprocess.run(
        [*cmd, "--ref", str(tmp_path / "ref")], capture_output=True, text=True, check=True
    ).stdout
    return float(out.split("BLEU4 = ")[1].split(",")[0])


HYPS = [
    "die Café @-@ Liebhaber sind heute nicht hier .",
    "ein Haus @-@ Boot auf dem See und ein Auto",
    "er sagt &quot; ja &quot; und geht nach Hause .",
]
REFS = [
    "die Café @-@ Liebhaber sind nicht hier .",
    "ein Haus @-@ Boot auf dem großen See und ein Auto .",
    "er sagt &quot; ja &quot; und geht heim .",
]


def test_compound_split_bleu_equals_fairseq_score_on_split_files(tmp_path):
    """scripts/compound_split_bleu.sh: the perl rewrite, then fairseq-score."""
    assert tt.compound_split("Haus @-@ Boot a-b-c") == (
        "Haus @ ##AT##-##AT## @ Boot a ##AT##-##AT## b-c"
    )  # perl's s{(\S)-(\S)}{...}g does not overlap matches
    split_h, split_r = [tt.compound_split(h) for h in HYPS], [tt.compound_split(r) for r in REFS]
    expected = _fairseq_score(tmp_path, split_h, split_r)
    assert tt.compound_split_bleu(HYPS, REFS) == pytest.approx(expected, abs=0.005)
    assert tt.tokenized_bleu(HYPS, REFS) == pytest.approx(
        _fairseq_score(tmp_path, HYPS, REFS), abs=0.005
    )
    assert tt.compound_split_bleu(HYPS, REFS) != pytest.approx(tt.tokenized_bleu(HYPS, REFS))


def test_translation_scores_detokenise_moses_escapes():
    """Hypotheses as fairseq-generate prints them (Moses tokens, XML-escaped) score 100
    against the raw references."""
    hyps = {0: "i don &apos;t know &amp; you ?", 1: "the &quot; house &quot; @-@ boat ."}
    scores = fairseq_evaluate.translation_scores(
        hyps, ["i don't know & you?", 'the "house"-boat.'], "en"
    )
    assert scores["sacrebleu"] == pytest.approx(100.0)


def test_map_lines_in_worker_processes_keeps_order():
    import functools

    lines = [f"Zeile {i}, „ok“." for i in range(10_050)]
    step = functools.partial(tt.tokenize, lang="de")
    assert tt.map_lines(step, lines, workers=2) == [step(line) for line in lines]


def test_subword_nmt_in_worker_processes_gives_the_same_files(tmp_path):
    """``workers`` > 1 (subword-nmt's own --num-workers) changes nothing in the output."""
    lines = [f"das haus {i % 7} und die häuser , die hausboote {i % 5} ." for i in range(400)]
    text = tmp_path / "text"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for workers in (1, 2):
        tt.learn_bpe(text, tmp_path / f"code{workers}", 50, workers=workers)
        tt.apply_bpe(tmp_path / f"code{workers}", text, tmp_path / f"bpe{workers}", workers)
    assert (tmp_path / "code1").read_text() == (tmp_path / "code2").read_text()
    assert (tmp_path / "bpe1").read_text() == (tmp_path / "bpe2").read_text()

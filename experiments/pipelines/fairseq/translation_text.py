"""The text steps of fairseq's translation recipes, done by the field's own tools.

``examples/translation/prepare-iwslt14.sh`` and ``prepare-wmt14en2de.sh`` pipe the corpus
through Moses' Perl scripts and subword-nmt; each function here is one of those steps,
done by sacremoses (the Python port of the Moses scripts) or subword-nmt's Python API:

- ``normalize-punctuation.perl LANG``: :func:`normalize_punctuation`;
- ``remove-non-printing-char.perl``: :func:`remove_non_printing_char`;
- ``sed "s/’/'/g"`` (on the valid/test files): :func:`straighten_apostrophes`;
- ``tokenizer.perl [-a] -l LANG`` (XML escaping on, Moses' default): :func:`tokenize`;
- ``clean-corpus-n.perl -ratio R CORPUS L1 L2 OUT MIN MAX``: :func:`clean_corpus`;
- ``lowercase.perl``: :func:`lowercase`;
- ``learn_bpe.py -s N`` / ``apply_bpe.py -c CODE``: :func:`learn_bpe` / :func:`apply_bpe`;
- fairseq's ``--remove-bpe`` and Moses detokenisation: :func:`remove_bpe`, :func:`detokenize`;
- ``scripts/compound_split_bleu.sh``: :func:`compound_split_bleu`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import regex

from experiments.core.console import verbose

BPE_SEPARATOR = "@@"


# --- Moses (sacremoses) ---------------------------------------------------------------------


@functools.cache
def _normalizer(lang: str):
    from sacremoses import MosesPunctNormalizer

    # perl_parity: the Perl script's own ’ -> " and French-quote spacing
    return MosesPunctNormalizer(lang=lang, perl_parity=True)


@functools.cache
def _tokenizer(lang: str):
    from sacremoses import MosesTokenizer

    return MosesTokenizer(lang=lang)


@functools.cache
def _detokenizer(lang: str):
    from sacremoses import MosesDetokenizer

    return MosesDetokenizer(lang=lang)


def normalize_punctuation(line: str, lang: str) -> str:
    """``normalize-punctuation.perl LANG``: typographic quotes, dashes and spacing to ASCII."""
    return _normalizer(lang).normalize(line)


_NON_PRINTING = regex.compile(r"\p{C}")


def remove_non_printing_char(line: str) -> str:
    """``remove-non-printing-char.perl``: every control/format/unassigned character
    (Unicode category C) becomes a space."""
    return _NON_PRINTING.sub(" ", line)


def straighten_apostrophes(line: str) -> str:
    """The recipes' ``sed "s/’/'/g"`` on the valid/test files before tokenising."""
    return line.replace("’", "'")


def tokenize(line: str, lang: str, aggressive_dash: bool = False) -> str:
    """``tokenizer.perl -l LANG`` (``-a``: ``aggressive_dash``), with its default XML
    escaping (``'`` → ``&apos;``, ``&`` → ``&amp;``, ``|`` → ``&#124;``, ...)."""
    return _tokenizer(lang).tokenize(
        line, aggressive_dash_splits=aggressive_dash, return_str=True, escape=True
    )


def lowercase(line: str) -> str:
    """``lowercase.perl``."""
    return line.lower()


def detokenize(line: str, lang: str) -> str:
    """Moses detokenisation (XML unescaped, ``@-@`` joined), as fairseq's
    ``--eval-bleu-detok moses`` / ``--tokenizer moses`` decode."""
    return _detokenizer(lang).detokenize(line.split())


# --- clean-corpus-n.perl ----------------------------------------------------------------------

_SPACES = regex.compile(r"\s+")


def _clean_side(line: str, factored: bool) -> str:
    if not factored:
        line = line.replace("|", "")
    return _SPACES.sub(" ", line).strip(" ")


def clean_corpus(
    pairs: Iterable[tuple[str, str]],
    min_len: int,
    max_len: int,
    ratio: float,
    max_word_length: int = 1000,
) -> Iterator[tuple[str, str]]:
    """``clean-corpus-n.perl -ratio RATIO CORPUS L1 L2 OUT MIN_LEN MAX_LEN``.

    Whitespace runs become one space and the ends are trimmed (and ``|`` is removed unless
    the first pair looks factored, i.e. holds one); a pair is kept when both sides are
    non-empty with ``min_len ≤ words ≤ max_len``, the word-count ratio is at most ``ratio``
    either way, and no word is longer than ``max_word_length`` characters. Kept pairs are
    yielded in their cleaned form.
    """
    too_long = regex.compile(rf"[^\s|]{{{max_word_length + 1}}}")
    factored = None
    for src, tgt in pairs:
        if factored is None:
            factored = "|" in src or "|" in tgt
        src, tgt = _clean_side(src, factored), _clean_side(tgt, factored)
        if not src or not tgt:
            continue
        ns, nt = len(src.split(" ")), len(tgt.split(" "))
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        if too_long.search(src) or too_long.search(tgt):
            continue
        yield src, tgt


# --- subword-nmt ------------------------------------------------------------------------------


def learn_bpe(train_text: str | Path, codes: str | Path, num_symbols: int, workers: int = 1):
    """``learn_bpe.py -s NUM_SYMBOLS < TRAIN > CODES`` (min frequency 2, subword-nmt's
    defaults); ``workers`` count the vocabulary in parallel (its ``--num-workers``).
    subword-nmt's own progress bar over the merges shows only with ``verbose=true``."""
    from subword_nmt.learn_bpe import learn_bpe as subword_learn_bpe

    with (
        open(train_text, encoding="utf-8") as infile,
        open(codes, "w", encoding="utf-8") as outfile,
        contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO()),
    ):
        subword_learn_bpe(infile, outfile, int(num_symbols), num_workers=max(1, int(workers)))


def apply_bpe(codes: str | Path, text: str | Path, out: str | Path, workers: int = 1) -> None:
    """``apply_bpe.py -c CODES < TEXT > OUT`` (separator ``@@``, all merges)."""
    from subword_nmt.apply_bpe import BPE

    with open(codes, encoding="utf-8") as f:
        bpe = BPE(f)
    with open(out, "w", encoding="utf-8") as outfile:
        bpe.process_lines(str(text), outfile, num_workers=max(1, int(workers)))


def remove_bpe(line: str) -> str:
    """fairseq's ``--remove-bpe`` (``"@@ "``): the tokenised text back."""
    return (line + " ").replace(BPE_SEPARATOR + " ", "").rstrip()


# --- scoring -------------------------------------------------------------------------------------

_HYPHEN_IN_WORD = regex.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    """fairseq's ``scripts/compound_split_bleu.sh`` rewrite: ``(\\S)-(\\S)`` →
    ``\\1 ##AT##-##AT## \\2``, so a hyphenated compound counts as three tokens."""
    return _HYPHEN_IN_WORD.sub(r"\1 ##AT##-##AT## \2", line)


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """BLEU4 on whitespace tokens, as ``fairseq-score`` computes it (no smoothing, no
    lowercasing, the standard brevity penalty)."""
    import sacrebleu

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    bleu = sacrebleu.corpus_bleu(
        list(hyps), [list(refs)], tokenize="none", smooth_method="none", force=True
    )
    return float(bleu.score)


def compound_split_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """``scripts/compound_split_bleu.sh``: tokenised BLEU after :func:`compound_split` of the
    tokenised hypotheses and references (the number WMT'14 En-De tables quote)."""
    return tokenized_bleu([compound_split(h) for h in hyps], [compound_split(r) for r in refs])


# --- running a step over many lines ---------------------------------------------------------------


def map_lines(
    step: Callable[[str], str], lines: Sequence[str], workers: int = 1, desc: str = ""
) -> list[str]:
    """``step`` on every line, in order, with a progress bar; ``workers`` > 1 processes
    (the recipes' ``-threads``). ``step`` must be picklable (a module function or a
    ``functools.partial`` of one)."""
    from tqdm import tqdm

    bar = {"total": len(lines), "desc": desc, "unit": " lines", "disable": None, "leave": False}
    if workers <= 1 or len(lines) < 10_000:
        return [step(line) for line in tqdm(lines, **bar)]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(tqdm(pool.imap(step, lines, chunksize=2_000), **bar))

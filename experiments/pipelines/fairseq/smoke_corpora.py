"""Small generated corpora for the smoke profile, with structure that only attention solves.

They are written as ordinary files (text lines for LM, JSON lines with a ``translation``
column for MT, the layout of the hub datasets) and then read through exactly the same
``datasets`` → tokenise/BPE → ``fairseq-preprocess`` path as the real corpora.

* ``lm_recall``: WikiText-style paragraphs of key/value facts followed by queries. A query's
  value is determined by a fact earlier in the same paragraph, so a model only predicts it
  well by attending back to it (associative recall); everything else is random.
* ``mt_reorder``: a toy German→English: a lexicon maps source words (and compounds, which
  BPE has to split) to target words, the verb moves from the end to second position,
  articles mark subject and object. Translating needs an alignment, i.e. attention.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_SYLLABLES = [
    "ka", "lu", "bre", "mi", "to", "sen", "dar", "fi", "gol", "har", "ur", "ne", "pol", "ste",
    "wen", "zi", "ra", "mo", "tel", "ba",
]  # fmt: skip


def _words(rng: random.Random, n: int, syllables: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(syllables)))
    return sorted(out)


def lm_recall(out_dir: str | Path, n_train: int, n_valid: int, n_test: int, seed: int) -> None:
    """Write ``wiki.{train,valid,test}.tokens``: one paragraph (document) per line."""
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(60)]
    values = _words(rng, 40, 2)

    def paragraph() -> str:
        facts = dict(zip(rng.sample(keys, rng.randint(3, 6)), rng.choices(values, k=6)))
        stated = " , ".join(f"{k} is {v}" for k, v in facts.items())
        asked = rng.sample(list(facts), len(facts))
        queries = " ".join(f"{k} ? {facts[k]} ." for k in asked)
        return f" facts : {stated} . query : {queries} "

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        lines = [" = Record = ", ""] + [paragraph() for _ in range(n)]
        (out / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")


def mt_reorder(
    out_dir: str | Path,
    n_train: int,
    n_valid: int,
    n_test: int,
    seed: int,
    source_lang: str = "de",
    target_lang: str = "en",
) -> None:
    """Write ``{train,validation,test}.jsonl`` rows ``{"translation": {src: ..., tgt: ...}}``."""
    rng = random.Random(seed)
    src_nouns = _words(rng, 24, 2)
    tgt_nouns = _words(random.Random(seed + 1), 24, 3)
    src_verbs, tgt_verbs = _words(rng, 8, 3), _words(random.Random(seed + 2), 8, 2)
    src_adjs, tgt_adjs = _words(rng, 8, 2), _words(random.Random(seed + 3), 8, 1)
    noun = dict(zip(src_nouns, tgt_nouns))
    verb = dict(zip(src_verbs, tgt_verbs))
    adj = dict(zip(src_adjs, tgt_adjs))

    def noun_phrase(article: str) -> tuple[str, str]:
        head = rng.choice(src_nouns)
        if rng.random() < 0.3:  # compound: one source word, two target words
            mod = rng.choice(src_nouns)
            src, tgt = mod + head, f"{noun[mod]} {noun[head]}"
        else:
            src, tgt = head, noun[head]
        if rng.random() < 0.4:
            a = rng.choice(src_adjs)
            src, tgt = f"{a} {src}", f"{adj[a]} {tgt}"
        return f"{article} {src}", f"the {tgt}"

    def clause() -> tuple[str, str]:
        (s_src, s_tgt), (o_src, o_tgt) = noun_phrase("der"), noun_phrase("den")
        v = rng.choice(src_verbs)
        return f"{s_src} {o_src} {v}", f"{s_tgt} {verb[v]} {o_tgt}"  # SOV -> SVO

    def sentence() -> dict:
        parts = [clause() for _ in range(rng.choice((1, 1, 2)))]
        src = " und ".join(p[0] for p in parts)
        tgt = " and ".join(p[1] for p in parts)
        src, tgt = src[0].upper() + src[1:] + ".", tgt[0].upper() + tgt[1:] + "."
        return {"translation": {source_lang: src, target_lang: tgt}}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_valid), ("test", n_test)):
        rows = [json.dumps(sentence(), ensure_ascii=False) for _ in range(n)]
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


GENERATORS = {"lm_recall": lm_recall, "mt_reorder": mt_reorder}

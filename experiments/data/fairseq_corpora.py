"""Shared data preparation for the fairseq pipelines: corpus → text files → fairseq-preprocess.

One path for every corpus, real or smoke:

    Hugging Face ``datasets`` (hub id, or a local copy: ``save_to_disk`` folder / text, JSON
    lines or Parquet files)  →  tokenise (Moses-style) → lowercase / clean → BPE (joint,
    subword-nmt algorithm)  →  plain text files  →  ``fairseq-preprocess``  →  data-bin.

The settings (BPE merges, cleaning limits, ...) live in ``configs/data/<name>.yaml``; the
``scripts/prepare_*.py`` front ends and the experiment entry points both call
:func:`prepare`. A finished data-bin carries ``PREPARED.json`` with the fingerprint of the
settings it was built from; it is rebuilt only when that changes, and always in a temporary
folder renamed into place at the end (an interrupted build never looks finished).

The tokeniser and BPE learner are written here because neither ``sacremoses`` nor
``subword-nmt`` is installed in this environment: they follow the Moses ``tokenizer.perl``
rules that matter for BLEU (punctuation split off, apostrophes, digit-internal commas and
periods kept, ``-a`` hyphen splitting) and the subword-nmt merge algorithm, but are not
byte-identical to them (docs/language.md lists the differences).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import shutil
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import regex
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs" / "data"
PREPARED_FILE = "PREPARED.json"
SPLITS = ("train", "valid", "test")


class MissingCorpusError(FileNotFoundError):
    """The prepared data is not there; the message names the command that prepares it."""


# --- configuration ----------------------------------------------------------------------------


def load_data_config(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """``configs/data/<name>.yaml`` with ``key=value`` overrides, interpolations resolved."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.resolve(cfg)
    return cfg


_NOT_FINGERPRINTED = ("root", "dir", "workers", "prepare_command")


def fingerprint(cfg: DictConfig | Mapping) -> str:
    """Hash of the settings that determine the prepared data (not where it is stored)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    relevant = {k: v for k, v in dict(data).items() if k not in _NOT_FINGERPRINTED}
    if isinstance(relevant.get("corpus"), dict):  # where a local copy sits does not matter
        relevant["corpus"] = {k: v for k, v in relevant["corpus"].items() if k != "local_path"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def is_prepared(cfg: DictConfig) -> bool:
    """True when ``cfg.dir`` holds a finished build of exactly these settings."""
    marker = Path(cfg.dir) / PREPARED_FILE
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == fingerprint(cfg)
    except (OSError, json.JSONDecodeError):
        return False


def require_prepared(cfg: DictConfig) -> Path:
    """The data-bin folder, or a :class:`MissingCorpusError` naming the preparing command."""
    if is_prepared(cfg):
        return Path(cfg.dir)
    raise MissingCorpusError(
        f"prepared data for '{cfg.name}' not found in {cfg.dir} (or built from other settings).\n"
        f"Prepare it with:  {cfg.prepare_command} root={cfg.root}\n"
        "(from the Hugging Face hub when online, or add corpus.local_path=/path/to/a/local/copy)"
    )


# --- reading corpora through Hugging Face datasets ------------------------------------------------

_BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_corpus(corpus: DictConfig | Mapping, cache_dir: str | Path | None = None) -> dict:
    """Read the corpus splits with ``datasets``: {our split name: ``datasets.Dataset``}.

    ``corpus.local_path`` (a ``save_to_disk`` folder, or a folder holding the files named in
    ``corpus.files``) wins over ``corpus.hf_path`` (a hub dataset id). ``corpus.splits`` maps
    our split names (train/valid/test) to the corpus' own; a null entry is derived elsewhere.
    """
    import datasets

    splits = {ours: theirs for ours, theirs in dict(corpus["splits"]).items() if theirs}
    local = corpus.get("local_path")
    if local:
        local = Path(local)
        if not local.exists():
            raise MissingCorpusError(f"corpus.local_path={local} does not exist")
        if (local / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(local))
            return {ours: loaded[theirs] for ours, theirs in splits.items()}
        files = dict(corpus.get("files") or {})
        data_files = {theirs: str(local / files[theirs]) for theirs in splits.values()}
        for path in data_files.values():
            if not Path(path).exists():
                raise MissingCorpusError(f"corpus file {path} not found (see corpus.files)")
        suffix = Path(next(iter(data_files.values()))).suffix
        builder = _BUILDER_BY_SUFFIX.get(suffix, "text")
        loaded = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir)
        return {ours: loaded[theirs] for ours, theirs in splits.items()}
    if not corpus.get("hf_path"):
        raise MissingCorpusError("corpus has neither local_path nor hf_path")
    try:
        loaded = datasets.load_dataset(
            corpus["hf_path"],
            corpus.get("hf_name"),
            revision=corpus.get("hf_revision"),
            cache_dir=cache_dir,
        )
    except Exception as err:  # noqa: BLE001 - offline, unknown id, ...: say what to do instead
        raise MissingCorpusError(
            f"could not load {corpus['hf_path']} ({corpus.get('hf_name')}) from the Hugging Face "
            f"hub: {err}\nOffline? Point corpus.local_path at a local copy (a save_to_disk folder "
            f"or the files {dict(corpus.get('files') or {})})."
        ) from err
    return {ours: loaded[theirs] for ours, theirs in splits.items()}


def text_lines(dataset, column: str = "text") -> Iterator[str]:
    """Lines of a monolingual split (trailing newlines removed; blank lines kept)."""
    for row in dataset:
        yield row[column].rstrip("\n")


def parallel_lines(dataset, src: str, tgt: str) -> Iterator[tuple[str, str]]:
    """(source, target) pairs from a ``translation`` column ({lang: text}) or flat columns."""
    for row in dataset:
        pair = row.get("translation", row)
        yield pair[src].strip(), pair[tgt].strip()


# --- Moses-style tokenisation ---------------------------------------------------------------------

_NONBREAKING = {
    "en": {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no"},
    "de": {"z.b", "bzw", "usw", "dr", "prof", "nr", "ca", "vgl", "d.h", "u.a", "str", "st"},
}
_SPECIAL = regex.compile(r"([^\p{L}\p{N}\s\.'`,\-@])")
_SPACES = regex.compile(r"\s+")


def normalize_punctuation(text: str) -> str:
    """A small part of Moses' ``normalize-punctuation.perl`` and ``remove-non-printing-char``:
    typographic quotes/dashes to ASCII and control characters dropped."""
    table = {"„": '"', "“": '"', "”": '"', "«": '"', "»": '"', "‘": "'", "’": "'", "–": "-"}
    text = "".join(table.get(ch, ch) for ch in text)
    return "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch in "\t")


def tokenize(text: str, lang: str, aggressive_dash: bool = False) -> str:
    """Moses ``tokenizer.perl``-style tokenisation of one line (no XML escaping)."""
    text = _SPACES.sub(" ", f" {text.strip()} ")
    text = _SPECIAL.sub(r" \1 ", text)
    if aggressive_dash:  # Moses -a: "Café-Liebhaber" -> "Café @-@ Liebhaber"
        text = regex.sub(r"(?<=[\p{L}\p{N}])-(?=[\p{L}\p{N}])", " @-@ ", text)
    text = regex.sub(r"(?<!\p{N}),|,(?!\p{N})", " , ", text)  # keep 1,000 together
    text = regex.sub(r"\.{2,}", lambda m: f" {m.group(0)} ", text)
    if lang == "en":  # don't -> don 't ; John's -> John 's ; 1990's -> 1990 's
        text = regex.sub(r"(?<=\p{L})'(?=\p{L})", " \ue000", text)
        text = regex.sub(r"(?<=\p{N})'(?=s)", " \ue000", text)
    text = text.replace("'", " ' ").replace("\ue000", "'")
    words = text.split()
    nonbreaking = _NONBREAKING.get(lang, set())
    out = []
    for i, word in enumerate(words):
        if word.endswith(".") and len(word) > 1 and not regex.fullmatch(r"\.+", word):
            stem = word[:-1]
            keep = i < len(words) - 1 and (
                stem.lower() in nonbreaking
                or "." in stem  # U.S. , z.B.
                or regex.fullmatch(r"\p{Lu}", stem) is not None  # initials
                or regex.match(r"[\p{Ll}\p{N}]", words[i + 1]) is not None
            )
            if not keep:
                out.extend([stem, "."])
                continue
        out.append(word)
    return " ".join(out)


_ATTACH_LEFT = regex.compile(r"^[,.!?:;%)\]}]+$|^\.{2,}$|^'(s|t|re|ve|ll|d|m)$", regex.IGNORECASE)
_ATTACH_RIGHT = {"(", "[", "{", "$", "¿", "¡"}


def detokenize(line: str, lang: str) -> str:
    """Invert :func:`tokenize` as far as it can be (``@-@`` joins, punctuation, quotes)."""
    tokens = line.replace(" @-@ ", "-").split()
    out: list[str] = []
    glue_next = False
    open_quote = {'"': False, "'": False}
    for tok in tokens:
        if tok in open_quote and not (lang == "en" and tok == "'" and out and out[-1][-1:] == "s"):
            if open_quote[tok]:
                out[-1:] = [out[-1] + tok] if out else [tok]
                open_quote[tok] = False
                continue
            open_quote[tok] = True
            out.append(tok)
            glue_next = True
            continue
        if out and (glue_next or _ATTACH_LEFT.match(tok)):
            out[-1] += tok
        else:
            out.append(tok)
        glue_next = tok in _ATTACH_RIGHT
    return " ".join(out)


def clean_pairs(
    pairs: Iterable[tuple[str, str]], min_len: int, max_len: int, ratio: float
) -> Iterator[tuple[str, str]]:
    """Moses ``clean-corpus-n.perl``: keep pairs with min_len ≤ length ≤ max_len tokens on
    both sides and a length ratio of at most ``ratio`` either way."""
    for src, tgt in pairs:
        ns, nt = len(src.split()), len(tgt.split())
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        yield src, tgt


# --- byte-pair encoding (subword-nmt's algorithm, format and "@@ " separator) ---------------------

END_OF_WORD = "</w>"
SEPARATOR = "@@"


def learn_bpe(lines: Iterable[str], num_symbols: int, min_frequency: int = 2) -> list[tuple]:
    """Learn ``num_symbols`` merges on whitespace-tokenised lines (Sennrich et al., 2016).

    Words are character sequences with ``</w>`` glued to the last character; the most
    frequent adjacent pair is merged each step (ties by the pair's text, so it is
    deterministic). Pair counts are updated only for words that contain the merged pair,
    with a lazy max-heap over counts.
    """
    counts = Counter(word for line in lines for word in line.split())
    words = [(tuple(w[:-1]) + (w[-1] + END_OF_WORD,), n) for w, n in counts.items()]
    symbols = [list(w) for w, _ in words]
    freqs = [n for _, n in words]
    stats: Counter = Counter()
    where: defaultdict = defaultdict(set)
    for i, sym in enumerate(symbols):
        for pair in zip(sym, sym[1:]):
            stats[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in stats.items()]
    heapq.heapify(heap)
    merges: list[tuple] = []
    while len(merges) < num_symbols and heap:
        neg, pair = heapq.heappop(heap)
        if stats.get(pair, 0) != -neg:
            continue  # stale entry
        if -neg < min_frequency:
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set = set()
        for i in list(where.pop(pair, ())):
            old = symbols[i]
            for p in zip(old, old[1:]):
                stats[p] -= freqs[i]
                touched.add(p)
            new, j = [], 0
            while j < len(old):
                if j < len(old) - 1 and old[j] == pair[0] and old[j + 1] == pair[1]:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            symbols[i] = new
            for p in zip(new, new[1:]):
                stats[p] += freqs[i]
                where[p].add(i)
                touched.add(p)
        stats.pop(pair, None)
        for p in touched:
            if p == pair:
                continue
            n = stats.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p))
            else:
                stats.pop(p, None)
                where.pop(p, None)
    return merges


def write_bpe_codes(merges: list[tuple], path: str | Path) -> None:
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    _atomic_lines(path, lines)


def read_bpe_codes(path: str | Path) -> list[tuple]:
    lines = Path(path).read_text().splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


_NO_RANK = 1 << 62


class BPE:
    """Apply learned merges: ``"understanding"`` → ``"under@@ stand@@ ing"``."""

    def __init__(self, merges: list[tuple]) -> None:
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.cache: dict[str, str] = {}

    def segment_word(self, word: str) -> str:
        if word in self.cache:
            return self.cache[word]
        sym = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(sym) > 1:
            rank, k = min((self.ranks.get(p, _NO_RANK), k) for k, p in enumerate(zip(sym, sym[1:])))
            if rank == _NO_RANK:
                break
            first, second = sym[k], sym[k + 1]
            new, j = [], 0
            while j < len(sym):
                if j < len(sym) - 1 and sym[j] == first and sym[j + 1] == second:
                    new.append(first + second)
                    j += 2
                else:
                    new.append(sym[j])
                    j += 1
            sym = new
        sym[-1] = sym[-1][: -len(END_OF_WORD)]
        if not sym[-1]:  # the word ended right at a merged "</w>" symbol
            sym.pop()
        out = " ".join(s + SEPARATOR for s in sym[:-1]) + (" " if len(sym) > 1 else "") + sym[-1]
        self.cache[word] = out
        return out

    def __call__(self, line: str) -> str:
        return " ".join(self.segment_word(w) for w in line.split())


def remove_bpe(line: str) -> str:
    return (line + " ").replace(SEPARATOR + " ", "").rstrip()


# --- writing text and binarising -----------------------------------------------------------------


def _atomic_lines(path: str | Path, lines: Iterable[str]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.replace("\n", " ") + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Write lines atomically; returns how many."""
    return _atomic_lines(path, lines)


def fairseq_preprocess(args: list[str], log_path: Path) -> None:
    """Run ``fairseq-preprocess`` with these arguments in a child process (importing fairseq
    here would put its Hydra schemas into this process' ConfigStore); output to ``log_path``."""
    import subprocess

    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", *args]
    with log_path.open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"fairseq-preprocess failed (exit {code}):\n{tail}")


def finish_build(cfg: DictConfig, build_dir: Path, stats: Mapping[str, Any]) -> Path:
    """Mark ``build_dir`` finished and move it to ``cfg.dir`` (replacing an older build)."""
    info = {
        "fingerprint": fingerprint(cfg),
        "name": cfg.name,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "stats": dict(stats),
    }
    (build_dir / PREPARED_FILE).write_text(json.dumps(info, indent=2) + "\n")
    dest = Path(cfg.dir)
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}")
        os.replace(dest, old)
        os.replace(build_dir, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(build_dir, dest)
    return dest


def new_build_dir(cfg: DictConfig) -> Path:
    dest = Path(cfg.dir)
    build = dest.with_name(f".{dest.name}.build{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    return build


def log(msg: str) -> None:
    print(f"[data] {msg}", file=sys.stderr, flush=True)


def seeded_rng(seed: int) -> random.Random:
    return random.Random(seed)


# --- the two pipelines ----------------------------------------------------------------------------


def _generate_if_needed(cfg: DictConfig) -> None:
    """Smoke corpora: write the generated files where ``corpus.local_path`` points, once."""
    gen = cfg.corpus.get("generate")
    if not gen:
        return
    from experiments.data.smoke_corpora import GENERATORS

    out = Path(cfg.corpus.local_path)
    files = [out / f for f in dict(cfg.corpus.files).values()]
    stamp = out / "GENERATED.json"
    settings = json.dumps(OmegaConf.to_container(gen, resolve=True), sort_keys=True)
    if stamp.exists() and stamp.read_text() == settings and all(f.exists() for f in files):
        return
    options = {k: v for k, v in json.loads(settings).items() if k != "kind"}
    if cfg.get("source_lang"):
        options.update(source_lang=cfg.source_lang, target_lang=cfg.target_lang)
    log(f"generating the smoke corpus '{gen.kind}' in {out}")
    GENERATORS[gen.kind](out, **options)
    stamp.write_text(settings)


def prepare_language_model(cfg: DictConfig) -> Path:
    """WikiText-style corpus → ``fairseq-preprocess --only-source`` (fairseq's recipe: the
    corpus is already word-tokenised; no BPE)."""
    if is_prepared(cfg):
        log(f"{cfg.name}: already prepared in {cfg.dir} (skipping)")
        return Path(cfg.dir)
    start = time.time()
    _generate_if_needed(cfg)
    build = new_build_dir(cfg)
    corpus = load_corpus(cfg.corpus, cache_dir=build / "hf_cache")
    text = build / "text"
    column = cfg.corpus.get("text_column", "text")
    stats = {}
    for split in SPLITS:
        stats[f"{split}_lines"] = write_lines(
            text / f"{split}.tokens", text_lines(corpus[split], column)
        )
        log(f"{cfg.name}: {split}: {stats[f'{split}_lines']:,} lines")
    args = ["--only-source", "--destdir", str(build), "--workers", str(cfg.get("workers", 1))]
    for split in SPLITS:
        args += [f"--{split}pref", str(text / f"{split}.tokens")]
    fairseq_preprocess(args, build / "preprocess.out")
    shutil.rmtree(text)
    shutil.rmtree(build / "hf_cache", ignore_errors=True)
    dest = finish_build(cfg, build, stats)
    log(f"{cfg.name}: prepared in {time.time() - start:.0f} s -> {dest}")
    return dest


def _split_every_nth(pairs: list, n: int) -> tuple[list, list]:
    """awk 'NR%n==0' (valid) and 'NR%n!=0' (train) from fairseq's prepare scripts."""
    valid = [p for i, p in enumerate(pairs, 1) if i % n == 0]
    train = [p for i, p in enumerate(pairs, 1) if i % n != 0]
    return train, valid


def prepare_translation(cfg: DictConfig) -> Path:
    """Parallel corpus → Moses-style tokens (→ lowercase) → cleaning → joint BPE →
    ``fairseq-preprocess``, in the order of fairseq's ``prepare-iwslt14.sh`` /
    ``prepare-wmt14en2de.sh`` (``recipe.clean.stage`` says where the cleaning sits)."""
    if is_prepared(cfg):
        log(f"{cfg.name}: already prepared in {cfg.dir} (skipping)")
        return Path(cfg.dir)
    start = time.time()
    _generate_if_needed(cfg)
    src, tgt, recipe = cfg.source_lang, cfg.target_lang, cfg.recipe
    build = new_build_dir(cfg)
    corpus = load_corpus(cfg.corpus, cache_dir=build / "hf_cache")

    def prep(line: str, lang: str) -> str:
        if recipe.get("normalize_punctuation"):
            line = normalize_punctuation(line)
        line = tokenize(line.replace("’", "'"), lang, recipe.get("aggressive_dash", False))
        return line.lower() if recipe.get("lowercase") else line

    clean = recipe.get("clean") or {}

    def cleaned(pairs: list) -> list:
        return list(clean_pairs(pairs, clean.min_len, clean.max_len, clean.ratio))

    data: dict[str, list] = {}
    raw_refs: list[str] = []
    for split in SPLITS:
        if split not in corpus:
            continue
        pairs = []
        for s, t in parallel_lines(corpus[split], src, tgt):
            pairs.append((prep(s, src), prep(t, tgt)))
            if split == "test":
                raw_refs.append(t.lower() if recipe.get("lowercase") else t)
        data[split] = pairs
        log(f"{cfg.name}: {split}: {len(pairs):,} pairs tokenised ({time.time() - start:.0f} s)")
    if clean and clean.stage == "before_split":
        data["train"] = cleaned(data["train"])
    every = cfg.corpus.get("valid_every_nth_train")
    if "valid" not in data:
        if not every:
            raise ValueError("corpus.splits.valid is null: set corpus.valid_every_nth_train")
        data["train"], data["valid"] = _split_every_nth(data["train"], int(every))

    log(f"{cfg.name}: learning {recipe.bpe_symbols} joint BPE merges on train")
    merges = learn_bpe((line for pair in data["train"] for line in pair), int(recipe.bpe_symbols))
    write_bpe_codes(merges, build / "code")
    bpe = BPE(merges)
    for split, pairs in data.items():
        pairs = [(bpe(s), bpe(t)) for s, t in pairs]
        if clean and clean.stage == "after_bpe" and split != "test":
            pairs = cleaned(pairs)
        data[split] = pairs
    text = build / "text"
    stats = {}
    for split, pairs in data.items():
        stats[f"{split}_pairs"] = write_lines(text / f"{split}.{src}", (p[0] for p in pairs))
        write_lines(text / f"{split}.{tgt}", (p[1] for p in pairs))
    write_lines(build / f"test.raw.{tgt}", raw_refs)  # untokenised references for sacrebleu
    log(f"{cfg.name}: {stats} after cleaning and BPE ({time.time() - start:.0f} s)")

    args = ["--source-lang", src, "--target-lang", tgt, "--destdir", str(build)]
    args += ["--workers", str(cfg.get("workers", 1))]
    if recipe.get("joined_dictionary"):
        args.append("--joined-dictionary")
    for split in SPLITS:
        args += [f"--{split}pref", str(text / split)]
    fairseq_preprocess(args, build / "preprocess.out")
    if not recipe.get("keep_text", False):
        shutil.rmtree(text)
    shutil.rmtree(build / "hf_cache", ignore_errors=True)
    dest = finish_build(cfg, build, stats)
    log(f"{cfg.name}: prepared in {time.time() - start:.0f} s -> {dest}")
    return dest


def prepare(cfg: DictConfig) -> Path:
    """Prepare (or find already prepared) the data of one ``configs/data`` entry."""
    if cfg.kind == "language_model":
        return prepare_language_model(cfg)
    if cfg.kind == "translation":
        return prepare_translation(cfg)
    raise ValueError(f"unknown data kind {cfg.kind!r}")


def main(default_config: str, smoke_config: str, argv: list[str] | None = None) -> None:
    """Command line of the ``prepare_*.py`` scripts: ``[--smoke] [key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(
        description=f"Prepare configs/data/{default_config}.yaml (or its smoke corpus)."
    )
    parser.add_argument("--smoke", action="store_true", help=f"use {smoke_config}.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. root=/data corpus.local_path=/copy workers=8",
    )
    args = parser.parse_args(argv)
    cfg = load_data_config(smoke_config if args.smoke else default_config, args.overrides)
    try:
        dest = prepare(cfg)
    except MissingCorpusError as err:
        raise SystemExit(f"error: {err}") from err
    print(dest)

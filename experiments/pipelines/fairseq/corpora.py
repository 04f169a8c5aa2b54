"""Data preparation for the fairseq pipelines: corpus → text files → fairseq-preprocess.

One path for every corpus, real or smoke:

    Hugging Face ``datasets`` (hub id, or a local copy: ``save_to_disk`` folder, or text,
    JSON lines or Parquet files, globs allowed)  →  the steps of fairseq's shell recipe
    (Moses scripts via sacremoses, BPE via subword-nmt: ``translation_text``)  →  plain
    text files  →  ``fairseq-preprocess``  →  data-bin.

The settings (BPE merges, cleaning limits, ...) live in ``configs/data/<name>.yaml``; the
``scripts/prepare_*.py`` command lines and the experiment apps both call :func:`prepare`.
A finished data-bin carries ``PREPARED.json`` with the fingerprint of the settings (and of
the tools' versions) it was built from; it is rebuilt only when that changes, and always in
a temporary folder renamed into place at the end (an interrupted build never looks
finished).

One module of ~430 lines on purpose: it reads top to bottom as the recipe runs (settings and
fingerprint → reading the corpus → text files → binarising → the language-model and
translation recipes); the text steps themselves live in ``translation_text``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.core.errors import RunStop
from experiments.core.io import REPO_ROOT
from experiments.pipelines.fairseq import translation_text as tt
from experiments.pipelines.fairseq.smoke_corpora import GENERATORS

CONFIG_DIR = REPO_ROOT / "configs" / "data"
PREPARED_FILE = "PREPARED.json"
SPLITS = ("train", "valid", "test")


class MissingCorpusError(RunStop, FileNotFoundError):
    """The prepared data is not there; the message names the command that prepares it."""


# --- configuration ----------------------------------------------------------------------------


def load_data_config(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """``configs/data/<name>.yaml`` with ``key=value`` overrides, interpolations resolved."""
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.resolve(cfg)
    return cfg


_NOT_FINGERPRINTED = ("root", "dir", "workers", "prepare_command", "compound_split_bleu")
# The packages whose output is the prepared text: another version rebuilds the data.
RECIPE_TOOLS = ("sacremoses", "subword-nmt")


def fingerprint(cfg: DictConfig | Mapping) -> str:
    """Hash of the settings that determine the prepared data (not where it is stored), and
    for translation data of the versions of :data:`RECIPE_TOOLS` that produce it."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    relevant = {k: v for k, v in dict(data).items() if k not in _NOT_FINGERPRINTED}
    if isinstance(relevant.get("corpus"), dict):  # where a local copy sits does not matter
        relevant["corpus"] = {k: v for k, v in relevant["corpus"].items() if k != "local_path"}
    if relevant.get("kind") == "translation":
        relevant["tools"] = {name: metadata.version(name) for name in RECIPE_TOOLS}
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
        f"prepared data for '{cfg.name}' not found in {cfg.dir} (or built from other settings); "
        f"prepare it with: {cfg.prepare_command} root={cfg.root} (from the Hugging Face hub "
        "when online, or add corpus.local_path=/path/to/a/local/copy)"
    )


# --- reading corpora through Hugging Face datasets ------------------------------------------------

_BUILDER_BY_SUFFIX = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_corpus(corpus: DictConfig | Mapping, cache_dir: str | Path | None = None) -> dict:
    """Read the corpus splits with ``datasets``: {our split name: ``datasets.Dataset``}.

    ``corpus.local_path`` (a ``save_to_disk`` folder, or a folder holding the files named in
    ``corpus.files``: paths or glob patterns relative to it, e.g. the hub's Parquet layout
    ``de-en/train/*.parquet``) wins over ``corpus.hf_path`` (a hub dataset id).
    ``corpus.splits`` maps our split names (train/valid/test) to the corpus' own; a null
    entry is derived elsewhere.
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
            if not glob.glob(path):
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


# --- writing text and binarising -----------------------------------------------------------------


def write_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Write lines atomically (a line break inside a line becomes a space); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.replace("\r", " ").replace("\n", " ") + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_lines(path: str | Path) -> list[str]:
    """The lines of a file written by :func:`write_lines` or subword-nmt (split at ``\\n``
    only, as the recipe's tools read them)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [line.rstrip("\n") for line in f]


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


# --- the two pipelines ----------------------------------------------------------------------------


def _generate_if_needed(cfg: DictConfig) -> None:
    """Smoke corpora: write the generated files where ``corpus.local_path`` points, once."""
    gen = cfg.corpus.get("generate")
    if not gen:
        return
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


def recipe_tokenize(line: str, lang: str, recipe: Mapping, held_out: bool) -> str:
    """One line through the recipe's steps up to tokenisation. Training text:
    [``normalize-punctuation.perl``] → [``remove-non-printing-char.perl``] → tokenise;
    held-out (valid/test) files: ``sed "s/’/'/g"`` → tokenise (both recipes)."""
    if held_out:
        line = tt.straighten_apostrophes(line)
    else:
        if recipe.get("normalize_punctuation"):
            line = tt.normalize_punctuation(line, lang)
        if recipe.get("remove_non_printing_char"):
            line = tt.remove_non_printing_char(line)
    return tt.tokenize(line, lang, bool(recipe.get("aggressive_dash")))


def prepare_translation(cfg: DictConfig) -> Path:
    """A parallel corpus through fairseq's ``prepare-iwslt14.sh`` / ``prepare-wmt14en2de.sh``,
    step for step, then ``fairseq-preprocess``:

    1. tokenise each side (:func:`recipe_tokenize`; train and held-out files differ);
    2. ``recipe.clean.stage == before_split`` (IWSLT): ``clean-corpus-n`` on train;
    3. ``recipe.lowercase`` (IWSLT): ``lowercase.perl`` on every split;
    4. no valid split in the corpus: valid = every ``valid_every_nth_train``-th train pair;
    5. ``learn_bpe.py -s recipe.bpe_symbols`` on train.src + train.tgt, ``apply_bpe.py`` to
       every file;
    6. ``recipe.clean.stage == after_bpe`` (WMT): ``clean-corpus-n`` on train and valid.

    The untokenised test references (lowercased when the recipe lowercases) are kept as
    ``test.raw.<tgt>`` for sacreBLEU; ``text/`` keeps the recipe's intermediate files
    (``tok.*`` tokenised, ``*.{src,tgt}`` after BPE) when ``recipe.keep_text``.
    """
    if is_prepared(cfg):
        log(f"{cfg.name}: already prepared in {cfg.dir} (skipping)")
        return Path(cfg.dir)
    start = time.time()
    _generate_if_needed(cfg)
    src, tgt = str(cfg.source_lang), str(cfg.target_lang)
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    workers = int(cfg.get("workers", 1))
    clean = recipe.get("clean") or {}
    build = new_build_dir(cfg)
    text = build / "text"
    corpus = load_corpus(cfg.corpus, cache_dir=build / "hf_cache")

    def cleaned(pairs: list) -> list:
        return list(tt.clean_corpus(pairs, clean["min_len"], clean["max_len"], clean["ratio"]))

    data: dict[str, list[tuple[str, str]]] = {}
    raw_refs: list[str] = []
    for split in SPLITS:
        if split not in corpus:
            continue
        pairs = list(parallel_lines(corpus[split], src, tgt))
        sides = []
        for lang, lines in ((src, [p[0] for p in pairs]), (tgt, [p[1] for p in pairs])):
            step = functools.partial(
                recipe_tokenize, lang=lang, recipe=recipe, held_out=split != "train"
            )
            sides.append(tt.map_lines(step, lines, workers, desc=f"tokenize {split}.{lang}"))
        data[split] = list(zip(*sides))
        if split == "test":
            raw_refs = [p[1] for p in pairs]
        log(f"{cfg.name}: {split}: {len(pairs):,} pairs tokenised ({time.time() - start:.0f} s)")
    if clean.get("stage") == "before_split":
        data["train"] = cleaned(data["train"])
    if recipe.get("lowercase"):
        data = {k: [(tt.lowercase(s), tt.lowercase(t)) for s, t in v] for k, v in data.items()}
        raw_refs = [tt.lowercase(r) for r in raw_refs]
    if "valid" not in data:
        every = cfg.corpus.get("valid_every_nth_train")
        if not every:
            raise ValueError("corpus.splits.valid is null: set corpus.valid_every_nth_train")
        data["train"], data["valid"] = _split_every_nth(data["train"], int(every))

    for split, pairs in data.items():
        write_lines(text / f"tok.{split}.{src}", (p[0] for p in pairs))
        write_lines(text / f"tok.{split}.{tgt}", (p[1] for p in pairs))
    joint = text / f"tok.train.{src}-{tgt}"
    write_lines(joint, [p[0] for p in data["train"]] + [p[1] for p in data["train"]])
    log(f"{cfg.name}: learning {recipe['bpe_symbols']} joint BPE merges on {joint.name}")
    tt.learn_bpe(joint, build / "code", int(recipe["bpe_symbols"]), workers)
    joint.unlink()
    stats: dict[str, int] = {}
    for split in data:
        for lang in (src, tgt):
            tt.apply_bpe(
                build / "code", text / f"tok.{split}.{lang}", text / f"{split}.{lang}", workers
            )
        if clean.get("stage") == "after_bpe" and split != "test":
            pairs = cleaned(
                zip(read_lines(text / f"{split}.{src}"), read_lines(text / f"{split}.{tgt}"))
            )
            write_lines(text / f"{split}.{src}", (p[0] for p in pairs))
            write_lines(text / f"{split}.{tgt}", (p[1] for p in pairs))
        stats[f"{split}_pairs"] = len(read_lines(text / f"{split}.{src}"))
    stats["bpe_merges"] = len(read_lines(build / "code")) - 1  # after the "#version" line
    # untokenised references for sacreBLEU, one per line for str.splitlines() readers
    write_lines(build / f"test.raw.{tgt}", (" ".join(r.splitlines()) for r in raw_refs))
    log(f"{cfg.name}: {stats} after cleaning and BPE ({time.time() - start:.0f} s)")

    args = ["--source-lang", src, "--target-lang", tgt, "--destdir", str(build)]
    args += ["--workers", str(workers)]
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

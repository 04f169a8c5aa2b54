"""Data preparation for the fairseq pipelines: corpus → text files → fairseq-preprocess.

One path for every corpus, real or smoke:

    Hugging Face ``datasets`` (hub id, or a local copy: ``save_to_disk`` folder, or text,
    JSON lines or Parquet files, globs allowed)  →  the steps of fairseq's shell recipe
    (Moses scripts via sacremoses, BPE via subword-nmt: ``translation_text``)  →  plain
    text files  →  ``fairseq-preprocess``  →  data-bin.

The settings (BPE merges, cleaning limits, ...) live in ``configs/data/<name>.yaml``; the
``scripts/prepare_*.py`` command lines and the experiment apps both call :func:`prepare`.
A finished data-bin carries ``PREPARED.json`` with the fingerprint of the settings (and of
the tools' versions) it was built from and the size and SHA-256 of every file it holds; it
is rebuilt only when the settings change or a file no longer matches, and always in a
temporary folder renamed into place at the end (an interrupted build never looks
finished). Every run checks the sizes and each fairseq index against its ``.bin`` before
training (cheap); ``python -m scripts.prepare_<corpus> --verify`` also checks every
checksum. A build folder whose preparation was killed is removed by the next preparation;
``fairseq-preprocess`` runs as a child that dies with its parent.

One module of ~430 lines on purpose: it reads top to bottom as the recipe runs (settings and
fingerprint → reading the corpus → text files → binarising → the language-model and
translation recipes); the text steps themselves live in ``translation_text``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.core.errors import RunStop
from experiments.core.io import REPO_ROOT, atomic_write_text
from experiments.pipelines.fairseq import translation_text as tt
from experiments.pipelines.fairseq.smoke_corpora import GENERATORS
from experiments.pipelines.fairseq.stages import run_stage

CONFIG_DIR = REPO_ROOT / "configs" / "data"
PREPARED_FILE = "PREPARED.json"
SPLITS = ("train", "valid", "test")


class MissingCorpusError(RunStop, FileNotFoundError):
    """The prepared data is not there; the message names the command that prepares it."""


class DamagedDataError(RunStop, ValueError):
    """A prepared file no longer matches its record; the message names it and the command
    that rebuilds the data."""


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


def _record(cfg: DictConfig) -> dict | None:
    """``PREPARED.json`` of ``cfg.dir`` if it is a finished build of exactly these settings."""
    marker = Path(cfg.dir) / PREPARED_FILE
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("fingerprint") == fingerprint(cfg) else None


def is_prepared(cfg: DictConfig, full: bool = False) -> bool:
    """True when ``cfg.dir`` holds a finished build of exactly these settings whose files
    pass :func:`damage` (the cheap check; ``full``: every checksum too)."""
    record = _record(cfg)
    return record is not None and damage(Path(cfg.dir), record, full) is None


def rebuild_command(cfg: DictConfig) -> str:
    return f"{cfg.prepare_command} root={cfg.root}"


def require_prepared(cfg: DictConfig, full: bool = False) -> Path:
    """The data-bin folder, or a :class:`MissingCorpusError` naming the preparing command
    (:class:`DamagedDataError` naming the file, when a finished build no longer matches)."""
    record = _record(cfg)
    if record is not None:
        problem = damage(Path(cfg.dir), record, full)
        if problem is None:
            return Path(cfg.dir)
        raise DamagedDataError(
            f"prepared data for '{cfg.name}' is damaged: {problem}; rebuild it with: "
            f"{rebuild_command(cfg)}"
        )
    raise MissingCorpusError(
        f"prepared data for '{cfg.name}' not found in {cfg.dir} (or built from other settings); "
        f"prepare it with: {rebuild_command(cfg)} (from the Hugging Face hub "
        "when online, or add corpus.local_path=/path/to/a/local/copy)"
    )


# --- what a finished build holds, and checking it -------------------------------------------------


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under ``folder`` but the record."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != PREPARED_FILE)
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
        for p in files
    }


_INDEX_MAGIC = b"MMIDIDX\x00\x00"  # fairseq's mmap index: magic, version, dtype, count
_INDEX_HEADER = struct.Struct("<9sQBQ")
_ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}  # dtype code


def index_problem(idx: Path) -> str | None:
    """Why a fairseq ``.idx`` / ``.bin`` pair is inconsistent (None: it is not): the index
    must hold its header, one size and one pointer per sequence, and its last sequence must
    end exactly where the ``.bin`` ends."""
    data = idx.with_suffix(".bin")
    if not data.exists():
        return f"{data} is missing"
    size = idx.stat().st_size
    with idx.open("rb") as f:
        header = f.read(_INDEX_HEADER.size)
        if len(header) < _INDEX_HEADER.size:
            return f"{idx} is cut short ({size} bytes, less than its header)"
        magic, version, code, count = _INDEX_HEADER.unpack(header)
        if magic != _INDEX_MAGIC or version != 1 or code not in _ITEM_BYTES:
            return f"{idx} is not a fairseq mmap index"
        expected = _INDEX_HEADER.size + 12 * count
        if size != expected:
            return f"{idx} has {size} bytes where its {count} sequences need {expected}"
        if count == 0:
            end = 0
        else:
            f.seek(_INDEX_HEADER.size + 4 * (count - 1))
            (last_size,) = struct.unpack("<i", f.read(4))
            f.seek(_INDEX_HEADER.size + 4 * count + 8 * (count - 1))
            (last_pointer,) = struct.unpack("<q", f.read(8))
            end = last_pointer + last_size * _ITEM_BYTES[code]
    if data.stat().st_size != end:
        return f"{data} has {data.stat().st_size} bytes where its index {idx.name} needs {end}"
    return None


def damage(folder: Path, record: Mapping[str, Any], full: bool = False) -> str | None:
    """What is wrong with a finished build (None: nothing): a recorded file missing or of
    another size, an index inconsistent with its data, and with ``full`` a checksum that
    differs. A record from before files were recorded gets the index check only."""
    files = record.get("files") or {}
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, {meta['bytes']} when prepared"
    for idx in sorted(folder.glob("*.idx")):
        problem = index_problem(idx)
        if problem is not None:
            return problem
    if full:
        for name, meta in files.items():
            if sha256_of(folder / name) != meta["sha256"]:
                return f"{folder / name} has other content than when prepared (SHA-256 differs)"
    return None


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
    here would put its Hydra schemas into this process' ConfigStore) that dies with this
    process, its ``--workers`` included; output to ``log_path``."""
    run_stage("preprocess", args, log_path)


def finish_build(cfg: DictConfig, build_dir: Path, stats: Mapping[str, Any]) -> Path:
    """Mark ``build_dir`` finished and move it to ``cfg.dir`` (replacing an older build)."""
    info = {
        "fingerprint": fingerprint(cfg),
        "name": cfg.name,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "stats": dict(stats),
        "files": file_record(build_dir),
    }
    atomic_write_text(build_dir / PREPARED_FILE, json.dumps(info, indent=2) + "\n")
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


# The build folders of live preparations: their lock files stay locked while they live.
_BUILD_LOCKS: dict[Path, int] = {}


def _lock_path(build: Path) -> Path:
    return build.with_name(build.name + ".lock")


def remove_abandoned_builds(cfg: DictConfig) -> None:
    """Remove the ``.<dir>.build<pid>`` (and ``.<dir>.old<pid>``) folders of preparations that
    were killed: those whose lock file no process holds any more."""
    dest = Path(cfg.dir)
    if not dest.parent.is_dir():
        return
    for build in dest.parent.glob(f".{dest.name}.build*"):
        if build.name.endswith(".lock") or build in _BUILD_LOCKS:
            continue
        lock = _lock_path(build)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live preparation
        old = dest.with_name(f".{dest.name}.old{build.name.rpartition('.build')[2]}")
        log(f"removing {build}, left by a preparation that was stopped")
        shutil.rmtree(build, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)


def new_build_dir(cfg: DictConfig) -> Path:
    """An empty build folder beside ``cfg.dir``, locked for as long as this process builds."""
    remove_abandoned_builds(cfg)
    dest = Path(cfg.dir)
    build = dest.with_name(f".{dest.name}.build{os.getpid()}")
    build.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(build), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _BUILD_LOCKS[build] = fd
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    return build


def _release_build(build: Path) -> None:
    """Remove a build folder's lock (after it became the data-bin, or failed)."""
    fd = _BUILD_LOCKS.pop(build, None)
    if fd is not None:
        _lock_path(build).unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def _building(cfg: DictConfig):
    """A locked build folder; removed if the preparation fails in this process."""
    build = new_build_dir(cfg)
    try:
        yield build
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
        _release_build(build)


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


def build_language_model(cfg: DictConfig, build: Path) -> dict[str, int]:
    """WikiText-style corpus → ``fairseq-preprocess --only-source`` in ``build`` (fairseq's
    recipe: the corpus is already word-tokenised; no BPE); returns the line counts."""
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
    return stats


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


def build_translation(cfg: DictConfig, build: Path) -> dict[str, int]:
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
    (``tok.*`` tokenised, ``*.{src,tgt}`` after BPE) when ``recipe.keep_text``. Returns the
    pair counts and the number of BPE merges.
    """
    start = time.time()
    src, tgt = str(cfg.source_lang), str(cfg.target_lang)
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    workers = int(cfg.get("workers", 1))
    clean = recipe.get("clean") or {}
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
    return stats


BUILDERS = {"language_model": build_language_model, "translation": build_translation}


def prepare(cfg: DictConfig) -> Path:
    """Prepare (or find already prepared and intact) the data of one ``configs/data`` entry:
    the builder of its kind in a locked build folder, renamed into place with its record."""
    if cfg.kind not in BUILDERS:
        raise ValueError(f"unknown data kind {cfg.kind!r}")
    remove_abandoned_builds(cfg)
    if is_prepared(cfg):
        log(f"{cfg.name}: already prepared in {cfg.dir} (skipping)")
        return Path(cfg.dir)
    if _record(cfg) is not None:
        log(f"{cfg.name}: {damage(Path(cfg.dir), _record(cfg))}; rebuilding")
    start = time.time()
    _generate_if_needed(cfg)
    with _building(cfg) as build:
        stats = BUILDERS[cfg.kind](cfg, build)
        dest = finish_build(cfg, build, stats)
    log(f"{cfg.name}: prepared in {time.time() - start:.0f} s -> {dest}")
    return dest


def verify(cfg: DictConfig) -> str:
    """The full check (sizes, indexes and every checksum): a line saying the data is intact,
    or :class:`DamagedDataError` / :class:`MissingCorpusError` naming what to do."""
    folder = require_prepared(cfg, full=True)
    files = (_record(cfg) or {}).get("files") or {}
    if not files:
        return (
            f"{folder}: indexes consistent; its {PREPARED_FILE} predates file checksums "
            f"(rebuild with {rebuild_command(cfg)} to record them)"
        )
    return f"{folder}: all {len(files)} files match {PREPARED_FILE} (sizes and SHA-256)"


def main(default_config: str, smoke_config: str, argv: list[str] | None = None) -> None:
    """Command line of the ``prepare_*.py`` scripts: ``[--smoke] [key=value ...]``."""
    import argparse

    parser = argparse.ArgumentParser(
        description=f"Prepare configs/data/{default_config}.yaml (or its smoke corpus)."
    )
    parser.add_argument("--smoke", action="store_true", help=f"use {smoke_config}.yaml")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the prepared files against PREPARED.json (sizes, indexes, SHA-256); build nothing",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. root=/data corpus.local_path=/copy workers=8",
    )
    args = parser.parse_args(argv)
    cfg = load_data_config(smoke_config if args.smoke else default_config, args.overrides)
    try:
        print(verify(cfg) if args.verify else prepare(cfg))
    except RunStop as err:
        raise SystemExit(f"error: {err}") from err

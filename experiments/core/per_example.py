"""Per-example records of a run's test evaluation, the material of confidence intervals and
paired tests (``experiments.pipelines.report.significance``).

Every record lives in ``<run dir>/per_example/``, compressed, and is written atomically by
the evaluation that produced the run's headline metric (a re-evaluation after a resume
replaces it, so a record never holds two evaluations or half of one):

- image classification: ``image_correct.npz``, ``correct`` (bool, one per validation image,
  in the validation set's order): whether the top-1 prediction was right;
- language modelling: ``token_log_probs.npz``, ``log_prob`` (float32, natural log, one per
  scored test token, ``-inf`` for probability 0) with the ``epsilon`` and ``vocab`` of the
  ε-perplexity;
- translation: ``hypotheses.detok.txt.gz`` and ``references.txt.gz`` (one sentence a line,
  the test set's order: the text sacreBLEU scored) and ``sacrebleu_signature.txt``. sacreBLEU
  reads ``.gz`` files itself: ``sacrebleu REF.gz -i HYP_A.gz HYP_B.gz --paired-bs``.
"""

from __future__ import annotations

import gzip
import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.core.io import atomic_write, atomic_write_text

PER_EXAMPLE_DIR = "per_example"
IMAGE_CORRECT = "image_correct.npz"
TOKEN_LOG_PROBS = "token_log_probs.npz"
HYPOTHESES = "hypotheses.detok.txt.gz"
REFERENCES = "references.txt.gz"
SACREBLEU_SIGNATURE = "sacrebleu_signature.txt"


def record_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / PER_EXAMPLE_DIR


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        tmp.write_bytes(buffer.getvalue())

    atomic_write(path, write)


def _write_lines_gz(path: Path, lines: Sequence[str]) -> None:
    if any("\n" in line for line in lines):
        raise ValueError(f"{path.name}: a sentence holds a line break")
    text = "".join(f"{line}\n" for line in lines).encode("utf-8")
    # mtime=0: the same sentences always give the same bytes
    atomic_write(path, lambda tmp: tmp.write_bytes(gzip.compress(text, mtime=0)))


def _read_lines_gz(path: Path) -> list[str]:
    return gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()


def save_image_correctness(run_dir: str | Path, correct: np.ndarray) -> Path:
    """Write ``per_example/image_correct.npz`` (one bool per validation image)."""
    path = record_dir(run_dir) / IMAGE_CORRECT
    _write_npz(path, {"correct": np.asarray(correct, dtype=bool).reshape(-1)})
    return path


def save_token_log_probs(path: str | Path, log_prob: np.ndarray, epsilon: float, vocab: int):
    """Write a ``token_log_probs.npz`` at ``path`` (the LM scorer is told where)."""
    arrays = {
        "log_prob": np.asarray(log_prob, dtype=np.float32).reshape(-1),
        "epsilon": np.float64(epsilon),
        "vocab": np.int64(vocab),
    }
    _write_npz(Path(path), arrays)


def save_translations(
    run_dir: str | Path, hypotheses: Sequence[str], references: Sequence[str], signature: str
) -> Path:
    """Write the detokenised hypotheses, the references and sacreBLEU's signature."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    folder = record_dir(run_dir)
    _write_lines_gz(folder / HYPOTHESES, hypotheses)
    _write_lines_gz(folder / REFERENCES, references)
    atomic_write_text(folder / SACREBLEU_SIGNATURE, signature.strip() + "\n")
    return folder


@dataclass(frozen=True)
class PerExample:
    """A run's record: ``kind`` is ``image_correct``, ``token_log_probs`` or
    ``translations``; the fields of the other kinds are None."""

    kind: str
    correct: np.ndarray | None = None
    log_prob: np.ndarray | None = None
    epsilon: float | None = None
    vocab: int | None = None
    hypotheses: list[str] | None = None
    references: list[str] | None = None
    signature: str | None = None

    def __len__(self) -> int:
        for values in (self.correct, self.log_prob, self.hypotheses):
            if values is not None:
                return len(values)
        return 0


def load_per_example(run_dir: str | Path) -> PerExample | None:
    """The run's record, or None when it has none (a run made before records were kept);
    ``ValueError`` naming the file when one is unreadable."""
    folder = record_dir(run_dir)
    path = folder
    try:
        if (path := folder / IMAGE_CORRECT).exists():
            with np.load(path, allow_pickle=False) as f:
                return PerExample("image_correct", correct=f["correct"].astype(bool))
        if (path := folder / TOKEN_LOG_PROBS).exists():
            with np.load(path, allow_pickle=False) as f:
                return PerExample(
                    "token_log_probs",
                    log_prob=f["log_prob"].astype(np.float64),
                    epsilon=float(f["epsilon"]),
                    vocab=int(f["vocab"]),
                )
        if (path := folder / HYPOTHESES).exists():
            hypotheses = _read_lines_gz(path)
            references = _read_lines_gz(path := folder / REFERENCES)
            signature = (path := folder / SACREBLEU_SIGNATURE).read_text().strip()
            if len(hypotheses) != len(references):
                raise ValueError(f"{len(hypotheses)} hypotheses, {len(references)} references")
            return PerExample(
                "translations", hypotheses=hypotheses, references=references, signature=signature
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: unreadable per-example record ({err})") from err
    return None

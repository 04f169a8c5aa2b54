"""What an offline W&B run wrote, read back from its ``run-<id>.wandb`` file.

wandb 0.31 ships no Python reader for these files (its readers are in wandb-core), but the
records are W&B's own protobuf messages (``wandb.proto.wandb_internal_pb2.Record``), framed
as in a LevelDB log: a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks, each with a
4-byte checksum, a 2-byte length and a 1-byte type (full, first, middle, last). A file cut
short by a kill ends in the middle of a chunk: what came before it is still read."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        body = data[pos + HEADER : pos + HEADER + length]
        if len(body) < length:
            return  # cut short by a kill
        pos += HEADER + length
        parts = [body] if kind in (FULL, FIRST) else [*parts, body]
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            yield record


def _items(items) -> dict[str, str]:
    return {item.key or "/".join(item.nested_key): item.value_json for item in items}


class OfflineRun:
    """The records of one ``offline-run-*`` folder, by kind."""

    def __init__(self, folder: Path) -> None:
        (self.file,) = Path(folder).glob("run-*.wandb")
        self.records = list(records(self.file))
        kinds = [r.WhichOneof("record_type") for r in self.records]
        runs = [r.run for r, k in zip(self.records, kinds) if k == "run"]
        self.run = runs[0] if runs else None  # None: not flushed yet
        self.history = [_items(r.history.item) for r, k in zip(self.records, kinds)
                        if k == "history"]  # fmt: skip
        self.summary: dict[str, str] = {}
        for r, k in zip(self.records, kinds):
            if k == "summary":
                self.summary.update(_items(r.summary.update))
        self.metrics = [r.metric for r, k in zip(self.records, kinds) if k == "metric"]
        self.artifacts = {r.artifact.name: r.artifact for r, k in zip(self.records, kinds)
                          if k == "artifact"}  # fmt: skip
        self.exited = "exit" in kinds

    def steps(self) -> list[int]:
        return [int(row["step"]) for row in self.history if "step" in row]

    def files(self, artifact: str) -> list[str]:
        return sorted(entry.path for entry in self.artifacts[artifact].manifest.contents)


def offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """Every offline folder under a run's ``wandb/`` directory, oldest first."""
    return [OfflineRun(folder) for folder in sorted(Path(wandb_dir).glob("offline-run-*"))]


def finished_run(wandb_dir: Path) -> OfflineRun:
    """The newest offline folder once its exit record is written: wandb 0.31's ``finish()``
    can return before its service has flushed the file (pytest-timeout guards the wait)."""
    while True:
        runs = offline_runs(wandb_dir)
        if runs and runs[-1].exited:
            return runs[-1]
        time.sleep(0.2)

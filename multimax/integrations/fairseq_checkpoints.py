"""Loading fairseq checkpoints under torch's ``weights_only=True`` default, without importing
fairseq (the experiment apps inspect checkpoints in-process; importing fairseq there would
register its schemas in Hydra's ConfigStore).

fairseq-fixed 0.12.3.1 calls ``torch.load(f, map_location="cpu")`` in
``checkpoint_utils.load_checkpoint_to_cpu``; since torch 2.6 that means ``weights_only=True``,
which refuses the ``argparse.Namespace`` a legacy (argparse) model such as ``transformer`` or
``multimax_transformer`` keeps in ``cfg.model``. Distributed training hits the same default
when it resumes: rank 0 reads the checkpoint and ``distributed_utils.broadcast_object``
sends the loaded state, whose ``cfg`` is an OmegaConf ``DictConfig`` by then, to the other
ranks through ``torch.save`` / ``torch.load``. Instead of turning the safety off, the types
fairseq's own checkpoints and that broadcast hold are added to torch's allow-list, once per
process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def fairseq_checkpoint_globals() -> list:
    """The non-tensor types a fairseq checkpoint may hold: the legacy model ``Namespace``,
    NumPy scalars (a best score or a meter value stored as ``np.float64``), and the OmegaConf
    containers of a loaded state's ``cfg`` with what they pickle (the resume broadcast)."""
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig, base, nodes

    types: list = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core to np._core
    types.append(core.multiarray.scalar)
    types.extend(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_))
    types += [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, typing.Any]
    types += [nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode,
              nodes.BooleanNode, nodes.EnumNode]  # fmt: skip
    types += [dict, list, int, float, str, bool, collections.defaultdict]  # their constructors
    return types


def allow_fairseq_checkpoints() -> None:
    """Allow-list :func:`fairseq_checkpoint_globals` for ``torch.load(weights_only=True)``.

    Idempotent. Called when the plugin is imported, so ``fairseq-generate`` / ``fairseq-eval-lm``
    / ``fairseq-train`` resume with ``--user-dir`` load checkpoints without ``weights_only=False``.
    """
    torch.serialization.add_safe_globals(fairseq_checkpoint_globals())


def load_fairseq_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """``torch.load`` of a fairseq checkpoint with ``weights_only=True`` and the allow-list;
    ``mmap=True`` maps the tensors instead of reading them (cheap for a quick look)."""
    allow_fairseq_checkpoints()
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def checkpoint_updates(path: str | Path) -> int:
    """The number of updates a fairseq checkpoint was saved at. Raises whatever reading the
    file raises (a truncated or corrupt file)."""
    state = load_fairseq_checkpoint(path, mmap=True)
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


__all__ = [
    "allow_fairseq_checkpoints",
    "checkpoint_updates",
    "fairseq_checkpoint_globals",
    "load_fairseq_checkpoint",
]

"""Set-up every pipeline shares: seeding, the distributed context, the normaliser options a
config asks for, and the one label a normaliser gets in run names, tables and figures."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from experiments.core.io import REPO_ROOT
from multimax.normalizers import default_output_normalizer

NORMALIZER_CONFIGS = REPO_ROOT / "configs" / "normalizer"
FIDELITY_CONFIGS = REPO_ROOT / "configs" / "fidelity"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistributedContext:
    """Rank / world size from torchrun's (or SLURM's) environment; single-process otherwise."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def init_distributed() -> DistributedContext:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank)


def normalizer_options(cfg: DictConfig | Mapping, which: str = "attention") -> tuple[str, dict]:
    """(name, options) for ``build_normalizer`` from ``cfg.normalizer`` and
    ``cfg.model.output_normalizer``.

    ``normalizer=NAME`` sets attention and output alike, except that a normaliser whose rows
    are not a distribution (sigmoid, softpick, stick-breaking) leaves the output to softmax;
    ``model.output_normalizer=NAME`` sets the output layer apart (it then gets that
    normaliser's default options).
    """
    norm = (
        OmegaConf.to_container(cfg["normalizer"], resolve=True)
        if isinstance(cfg["normalizer"], DictConfig)
        else dict(cfg["normalizer"])
    )
    name = norm.pop("name")
    if which == "attention":
        return name, norm
    if which != "output":
        raise ValueError(f"which must be 'attention' or 'output', got {which!r}")
    model = cfg.get("model") or {}
    out_name = model.get("output_normalizer") or name
    if out_name == name:
        out_name = default_output_normalizer(name)
    return out_name, (norm if out_name == name else {})


@cache
def _normalizer_defaults(name: str) -> dict[str, Any]:
    path = NORMALIZER_CONFIGS / f"{name}.yaml"
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if path.exists() else {}


def _flat(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@cache
def _fidelity_defaults(name: str) -> dict[str, Any]:
    path = FIDELITY_CONFIGS / f"{name}.yaml"
    return _flat(OmegaConf.to_container(OmegaConf.load(path))) if path.exists() else {}


def fidelity_label(fidelity: Mapping[str, Any] | None) -> str:
    """What a run reproduces (``configs/fidelity/``), as labels show it: "" for the paper's
    text as ``paper.yaml`` has it; otherwise the setting's name plus the keys that differ from
    its file: ``authors``, ``paper(incremental=softmax)``."""
    if not fidelity:
        return ""
    if isinstance(fidelity, DictConfig):
        fidelity = OmegaConf.to_container(fidelity, resolve=True)
    values = _flat(fidelity)
    name = str(values.pop("name", "paper"))
    defaults = _fidelity_defaults(name)
    changed = {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}
    if not changed:
        return "" if name == "paper" else name
    return f"{name}({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"


def normalizer_label(
    name: str,
    options: Mapping[str, Any] | None = None,
    output: str | None = None,
    fidelity: Mapping[str, Any] | None = None,
) -> str:
    """The normaliser as every table and figure names it: ``name``, plus the options that
    differ from ``configs/normalizer/<name>.yaml`` (``multimax(order=1)``,
    ``softmax(learn_temperature=True)``), plus ``/output`` when an output normaliser is
    given that is neither the same nor ``none`` (``softmax/multimax``), plus `` [authors]``
    when the run's ``fidelity`` is not the paper's (:func:`fidelity_label`), so runs of the
    paper's text and of the authors' code never share a row (a ``name`` that is already such a
    label, ``multimax [authors]``, keeps its suffix last)."""
    name, _, tagged = name.partition(" [")
    label = name
    if options:
        defaults = _normalizer_defaults(name)
        changed = {
            k: v
            for k, v in options.items()
            if k != "name" and (k not in defaults or defaults[k] != v)
        }
        if changed:
            label += f"({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"
    if output and output not in (name, "none"):
        label += f"/{output}"
    if reproduces := fidelity_label(fidelity):
        label += f" [{reproduces}]"
    elif tagged:
        label += f" [{tagged}"
    return label

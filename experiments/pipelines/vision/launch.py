"""One process per GPU when ``experiments.vision`` was started as a single process.

torchrun (or ``scripts/launch_vision.sh``) starts the workers itself. Hydra's submitit
launcher (``launcher=slurm``) and a plain ``python -m experiments.vision`` on a multi-GPU
machine start one process per node: that process re-launches the same command under
``torch.distributed.run`` with one worker per GPU (and, under SLURM with several nodes, the
rendezvous of the job's nodes), all writing to the same run directory, and waits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

WORKER_ENV = ("RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")
RDZV_PORT = 29500


def procs_per_node(cfg: DictConfig) -> int:
    choice = cfg.trainer.get("procs_per_node", "auto")
    if str(choice) == "auto":
        return torch.cuda.device_count()
    return int(choice)


def _slurm_nodes() -> tuple[int, int, str | None]:
    """(nodes, this node's rank, head node) of a SLURM job; (1, 0, None) outside one."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    if nodes <= 1:
        return 1, 0, None
    node_rank = int(os.environ.get("SLURM_NODEID", "0"))
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return nodes, node_rank, hosts[0]


def worker_command(cfg: DictConfig, overrides: list[str], run_dir: Path) -> list[str] | None:
    """The ``torch.distributed.run`` command to start, or None when this process should train
    itself (already a worker, or fewer than two processes wanted)."""
    if any(name in os.environ for name in WORKER_ENV):
        return None
    per_node = procs_per_node(cfg)
    nodes, node_rank, head = _slurm_nodes()
    if per_node * nodes < 2:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}"]
    if head is None:
        cmd.append("--standalone")
    else:
        job = os.environ.get("SLURM_JOB_ID", "multimax")
        cmd += [
            f"--nnodes={nodes}",
            f"--node_rank={node_rank}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{RDZV_PORT}",
            f"--rdzv_id={job}",
        ]
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.run.dir=", "dry_run="))]
    return [*cmd, "-m", "experiments.vision", *keep, f"hydra.run.dir={run_dir}"]


def run_workers(cmd: list[str]) -> None:
    print("starting the workers:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        sys.exit(done.returncode)

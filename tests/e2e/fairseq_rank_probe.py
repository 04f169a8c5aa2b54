"""Test helper: ``fairseq-train`` in this process, or on the ranks fairseq spawns / torchrun
starts, with every rank's normaliser parameters saved after each update.

    PROBE_OUT=DIR python tests/e2e/fairseq_rank_probe.py [--stand-in-gpus N] TRAIN_ARGS...

Each rank writes ``DIR/sigma_rank<r>.pt`` ({name: tensor} of every ``*normalizer*``
parameter) after every update. ``--stand-in-gpus N`` makes ``torch.cuda.device_count()``
answer N in this process only, so that fairseq's own launcher (which spawns one worker per
GPU) starts N CPU workers here; the workers themselves run with ``--cpu``.
"""

from __future__ import annotations

import os
import sys

import torch


def _dump_sigma_after_each_update() -> None:
    from fairseq import trainer

    original = trainer.Trainer.train_step
    out = os.environ["PROBE_OUT"]

    def train_step(self, samples, raise_oom=False):
        result = original(self, samples, raise_oom)
        sigma = {
            name.replace("module.", ""): p.detach().clone()  # DDP wrappers' prefixes
            for name, p in self.model.named_parameters()
            if "normalizer" in name
        }
        torch.save(sigma, os.path.join(out, f"sigma_rank{self.data_parallel_rank}.pt"))
        return result

    trainer.Trainer.train_step = train_step


def probe_main(cfg, **kwargs) -> None:
    """fairseq's training ``main`` with the probe installed (in each spawned worker too)."""
    _dump_sigma_after_each_update()
    from fairseq_cli.train import main

    main(cfg, **kwargs)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--stand-in-gpus"]:
        gpus = int(argv[1])
        argv = argv[2:]
        torch.cuda.device_count = lambda: gpus
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils

    from multimax.integrations.fairseq_checkpoints import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, input_args=argv))
    distributed_utils.call_main(cfg, probe_main)

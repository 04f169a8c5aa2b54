"""``--optimizer multimax_adam``: fairseq's Adam with normaliser parameters (σ scalars,
learned temperatures) in a group of their own without weight decay (BRIEF §1).

fairseq's optimisers receive a flat list of parameters, without names, so the plugin marks
the parameters of every normaliser it builds (:func:`exempt_from_weight_decay`) and the
optimiser groups by the mark. Everything else — options (``--adam-betas``, ``--adam-eps``,
``--weight-decay``, ...), fused Adam on GPUs, checkpoints — is fairseq's ``adam``.

fairseq's ``--fp16`` / ``--bf16`` optimiser wrappers hand the optimiser flattened fp32
copies, which carry no mark: there every parameter is decayed, as with ``adam`` (a warning
says so). ``--memory-efficient-fp16`` / ``--memory-efficient-bf16`` and ``--amp`` keep the
grouping.
"""

from __future__ import annotations

import logging

from fairseq.optim import register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from torch import nn

logger = logging.getLogger(__name__)

NO_WEIGHT_DECAY_MARK = "multimax_no_weight_decay"


def exempt_from_weight_decay(module: nn.Module) -> nn.Module:
    """Mark every parameter of ``module`` for the no-weight-decay group; returns it."""
    for param in module.parameters():
        setattr(param, NO_WEIGHT_DECAY_MARK, True)
    return module


def is_exempt(param) -> bool:
    return bool(getattr(param, NO_WEIGHT_DECAY_MARK, False))


@register_optimizer("multimax_adam", dataclass=FairseqAdamConfig)
class MultimaxAdam(FairseqAdam):
    """fairseq's ``adam`` (decoupled weight decay) with a second, decay-free group for the
    marked normaliser parameters."""

    def __init__(self, cfg: FairseqAdamConfig, params):
        params = list(params)
        if params and all(isinstance(p, dict) for p in params):
            super().__init__(cfg, params)  # already grouped by the caller
            return
        exempt = [p for p in params if is_exempt(p)]
        if exempt:
            params = [
                {"params": [p for p in params if not is_exempt(p)]},
                {"params": exempt, "weight_decay": 0.0},
            ]
            logger.info(f"multimax_adam: {len(exempt)} normaliser tensors without weight decay")
        elif cfg.weight_decay:
            logger.warning(
                "multimax_adam: no marked normaliser parameter reached the optimiser (none in "
                "the model, or --fp16/--bf16 flattened them): weight decay applies to all"
            )
        super().__init__(cfg, params)


__all__ = ["NO_WEIGHT_DECAY_MARK", "MultimaxAdam", "exempt_from_weight_decay", "is_exempt"]

"""``--optimizer multimax_adam``: fairseq's Adam with normaliser parameters (σ scalars,
learned temperatures) in a group of their own without weight decay (decay would pull σ towards the identity).

fairseq's optimisers receive a flat list of parameters, without names. The plugin marks the
parameters of every normaliser it builds with fairseq's own per-parameter mechanism,
``param.optim_overrides = {"optimizer": {"weight_decay": 0.0}}`` (read by fairseq's
``composite`` optimiser, and copied by ``FP16Optimizer`` onto its fp32 master copies), and
this optimiser groups parameters by those overrides. So the exemption holds under every
precision fairseq offers:

* fp32, ``--amp``, ``--memory-efficient-fp16`` / ``--memory-efficient-bf16``: the model's
  own parameters reach the optimiser;
* ``--bf16`` and ``--fp16 --fp16-no-flatten-grads``: per-parameter fp32 copies, which keep
  ``optim_overrides``;
* plain ``--fp16`` would flatten every parameter into one fp32 tensor, where no per-parameter
  setting can survive: this optimiser declares ``supports_flat_params = False``, so fairseq
  itself stops with "please set --fp16-no-flatten-grads" instead of decaying σ silently.
  The recipes (``configs/experiment/*.yaml``) set ``fp16_no_flatten_grads: true``; Adam is
  element-wise, so the update is the same as with the flat buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fairseq.optim import register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from torch import nn

logger = logging.getLogger(__name__)

# fairseq's per-parameter optimiser settings (see fairseq.optim.composite, FP16Optimizer).
OVERRIDES_ATTRIBUTE = "optim_overrides"
NO_WEIGHT_DECAY = {"optimizer": {"weight_decay": 0.0}}


def exempt_from_weight_decay(module: nn.Module) -> nn.Module:
    """Give every parameter of ``module`` fairseq's ``optim_overrides`` for zero weight
    decay; returns the module."""
    for param in module.parameters():
        setattr(param, OVERRIDES_ATTRIBUTE, {"optimizer": dict(NO_WEIGHT_DECAY["optimizer"])})
    return module


def optimizer_overrides(param) -> dict:
    """The optimiser settings ``param`` asks for (``{}`` for none)."""
    return dict((getattr(param, OVERRIDES_ATTRIBUTE, None) or {}).get("optimizer") or {})


def is_exempt(param) -> bool:
    return optimizer_overrides(param).get("weight_decay") == 0.0


def group_by_overrides(params: Iterable) -> list[dict]:
    """torch param groups: one for the parameters without overrides, one per distinct
    override (its settings as the group's options), in first-seen order."""
    groups: dict[tuple, dict] = {}
    for param in params:
        overrides = optimizer_overrides(param)
        key = tuple(sorted(overrides.items()))
        groups.setdefault(key, {"params": [], **overrides})["params"].append(param)
    return list(groups.values())


@register_optimizer("multimax_adam", dataclass=FairseqAdamConfig)
class MultimaxAdam(FairseqAdam):
    """fairseq's ``adam`` (decoupled weight decay) with parameter groups from fairseq's
    ``optim_overrides``: the plugin's normaliser parameters are not decayed."""

    def __init__(self, cfg: FairseqAdamConfig, params):
        params = list(params)
        if params and all(isinstance(p, dict) for p in params):
            super().__init__(cfg, params)  # already grouped by the caller
            return
        groups = group_by_overrides(params)
        exempt = sum(len(g["params"]) for g in groups if g.get("weight_decay") == 0.0)
        if exempt:
            logger.info(f"multimax_adam: {exempt} normaliser tensors without weight decay")
        super().__init__(cfg, groups)

    @property
    def supports_flat_params(self) -> bool:
        """False: a flat fp32 buffer (``--fp16`` without ``--fp16-no-flatten-grads``) cannot
        keep per-parameter weight decay, so fairseq refuses it with the flag to set."""
        return False


__all__ = [
    "NO_WEIGHT_DECAY",
    "MultimaxAdam",
    "exempt_from_weight_decay",
    "group_by_overrides",
    "is_exempt",
    "optimizer_overrides",
]

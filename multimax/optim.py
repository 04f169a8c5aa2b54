"""Optimiser parameter groups: what must not be weight-decayed."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .normalizers import Normalizer


def no_weight_decay_names(model: nn.Module, extra: Iterable[str] = ()) -> set[str]:
    """Names of parameters exempt from weight decay: every parameter of a normaliser module
    (σ scalars, learned temperatures), every bias and norm weight (ndim <= 1), and ``extra``
    names (e.g. a position embedding) matched exactly or as a dotted suffix."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, Normalizer):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + n for n, _ in module.named_parameters())
    extra = tuple(extra)
    for name, param in model.named_parameters():
        if param.ndim <= 1 or any(name == e or name.endswith("." + e) for e in extra):
            names.add(name)
    return names


def param_groups(
    model: nn.Module, weight_decay: float, extra_no_decay: Iterable[str] = ()
) -> list[dict]:
    """Two groups for a torch / timm optimiser: decayed weights and everything else at 0."""
    skip = no_weight_decay_names(model, extra_no_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


__all__ = ["no_weight_decay_names", "param_groups"]

"""No-weight-decay groups: normaliser scalars, biases and norms are exempt."""

import torch
from torch import nn

import multimax


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.attn_normalizer = multimax.MultiMax(order=2)
        self.temp = multimax.build_normalizer("softmax", learn_temperature=True)
        self.v2 = multimax.build_normalizer("multimax_v2")


def test_param_groups():
    model = Tiny()
    skip = multimax.no_weight_decay_names(model, extra=["pos_embed"])
    assert skip == {
        "pos_embed",
        "proj.bias",
        "norm.weight",
        "norm.bias",
        "attn_normalizer.low_threshold",
        "attn_normalizer.high_threshold",
        "attn_normalizer.low_coef",
        "attn_normalizer.high_coef",
        "temp.log_temperature",
        "v2.affine_scale",
        "v2.affine_shift",
        "v2.low_threshold",
        "v2.high_threshold",
        "v2.low_coef",
        "v2.high_coef",
    }
    decay, no_decay = multimax.param_groups(model, weight_decay=0.05, extra_no_decay=["pos_embed"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 8])]
    assert len(no_decay["params"]) == 15
    torch.optim.AdamW(multimax.param_groups(model, 0.05))  # accepted by a torch optimiser

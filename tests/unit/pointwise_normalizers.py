"""The normalisers whose σ is point-wise (the chunked loss and the fused output layer serve
them), with σ's parameters drawn away from zero so that MultiMax is not SoftMax."""

import torch

from multimax import build_normalizer


def strong(name, **options):
    n = build_normalizer(name, **options)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in n.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return n


NORMALIZERS = {
    "multimax2": lambda: strong("multimax", order=2),
    "multimax1": lambda: strong("multimax", order=1),
    "multimax3": lambda: strong("multimax", order=3),
    "multimax_v2": lambda: strong("multimax_v2"),
    "softmax_T0.7": lambda: build_normalizer("softmax", temperature=0.7),
    "softmax_learned": lambda: strong("softmax", learn_temperature=True),
}

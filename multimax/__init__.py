"""MultiMax: sparse and multi-modal normalisers for attention and output layers.

>>> import torch, multimax
>>> m = multimax.MultiMax(order=2)
>>> p = m(torch.randn(4, 10))                     # rows on the simplex
>>> n = multimax.build_normalizer("sparsemax")    # same forward(x, mask=None, dim=-1)
"""

from .attention import (
    ATTENTION_PATHS,
    attention,
    attention_with_weights,
    record_attention,
    use_attention_impl,
)
from .chunked_loss import sigma_cross_entropy
from .losses import NormalizerLoss, build_loss
from .modulation import MultiMax, MultiMaxV2, modulate, modulate_v2, multimax
from .normalizers import (
    NORMALIZERS,
    Entmax15,
    EntmaxAlpha,
    EvSoftmax,
    Normalizer,
    Sigmoid,
    Softmax,
    SoftmaxSink,
    Softpick,
    Sparsemax,
    SSMax,
    StickBreaking,
    build_normalizer,
)
from .optim import no_weight_decay_names, param_groups
from .output_layer import linear_sigma_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_PATHS",
    "NORMALIZERS",
    "Entmax15",
    "EntmaxAlpha",
    "EvSoftmax",
    "MultiMax",
    "MultiMaxV2",
    "Normalizer",
    "NormalizerLoss",
    "SSMax",
    "Sigmoid",
    "Softmax",
    "SoftmaxSink",
    "Softpick",
    "Sparsemax",
    "StickBreaking",
    "attention",
    "attention_with_weights",
    "build_loss",
    "build_normalizer",
    "linear_sigma_cross_entropy",
    "modulate",
    "modulate_v2",
    "multimax",
    "no_weight_decay_names",
    "param_groups",
    "record_attention",
    "sigma_cross_entropy",
    "use_attention_impl",
]

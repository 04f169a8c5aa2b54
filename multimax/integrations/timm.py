"""DeiT with global average pooling, every normaliser selectable, as registered timm models.

Importing this module registers with timm's model registry:

* ``deit_tiny_gap_patch16_224``  (192 dim, 12 layers, 3 heads; DeiT-tiny)
* ``deit_small_gap_patch16_224`` (384 dim, 12 layers, 6 heads; DeiT-small)
* ``deit_smoke_gap_patch4_16``   (64 dim, 4 layers, 4 heads, 16×16 input; smoke runs)

Each is timm's own :class:`~timm.models.vision_transformer.VisionTransformer` with
``class_token=False, global_pool="avg", fc_norm=False`` (LayerNorm on every token, then the
average: the authors' model) and :class:`NormalizedAttention` passed in through its
``attn_layer`` hook. Keyword arguments on top of timm's:

* ``normalizer`` (default ``"softmax"``): what every attention layer uses, with its options
  in ``normalizer_options`` (e.g. ``{"order": 2}``); a :class:`~multimax.Normalizer` instance
  is a template, deep-copied into every layer (one σ per layer);
* ``output_normalizer`` (default: same as ``normalizer``, or softmax where that one's rows
  are not a distribution: sigmoid, softpick) with ``output_normalizer_options``
  (default: ``normalizer_options`` when the names agree, else none);
* ``attention_impl`` (default ``"auto"``): passed to :func:`multimax.attention` as ``impl``;
* ``sigma_init`` (default: none, each normaliser's own): how σ starts, per layer kind,
  ``{"attention": {"kind": "zeros"}, "output": {"kind": "trunc_normal_timm", "std": 0.02}}``
  (kinds: :data:`multimax.modulation.SIGMA_INITS`); timm's own ``qkv_bias=False`` drops the
  qkv bias as the authors' DeiT does (docs/fidelity.md).

The model's ``forward`` returns plain logits z. Its predictive distribution is
``model.output_normalizer(z)`` (:meth:`GapVisionTransformer.predict_proba`), e.g.
MultiMax(z) = softmax(σ(z)); train it with
``multimax.build_loss(model.output_normalizer, label_smoothing=...)``, which shares the output
layer's σ and takes integer targets or Mixup / CutMix soft targets alike.
With softmax / softmax the state dict is timm's, key for key.

What timm's users rely on works as with timm's ViT: ``features_only=True`` (``feature_cls``
``"getter"`` by default, or ``"fx"``), FX tracing (the attention dispatch is one wrapped call,
for torch.fx and timm's notrace registry), ``forward_intermediates``, grad checkpointing,
``reset_classifier``, pickling and ``torch.save(model)``; ``torch.export`` traces it.
TorchScript does not (``torch.jit.script`` is refused with that advice).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.fx
from timm.layers import Attention, register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import multimax
from multimax.attention import AttentionInputs, select_path
from multimax.integrations.timm_checkpoints import (
    ARCHITECTURE_KEY,
    MODEL_ARGS_KEY,
    PRETRAINED_CFG_KEY,
    checkpoint_weights,
    load_checkpoint_file,
    read_model_card,
    saved_model_args,
)
from multimax.normalizers import (
    NORMALIZERS,
    Normalizer,
    attention_layer_options,
    build_normalizer,
    check_causal_use,
    check_output_normalizer,
    default_output_normalizer,
)

MODEL_NAMES = (
    "deit_tiny_gap_patch16_224",
    "deit_small_gap_patch16_224",
    "deit_smoke_gap_patch4_16",
)


def _sigma_init_options(spec: str | Normalizer | None, init: Mapping[str, Any] | None) -> dict:
    """``{init, init_std}`` for a normaliser name whose class has σ, from ``{kind, std}``."""
    if not init or isinstance(spec, Normalizer):
        return {}
    accepted = inspect.signature(NORMALIZERS[spec or "softmax"].__init__).parameters
    if "init" not in accepted:
        return {}
    return {"init": init["kind"], **({"init_std": init["std"]} if "std" in init else {})}


def _build(
    spec: str | Normalizer | None, options: Mapping[str, Any] | None, num_heads: int | None = None
) -> Normalizer:
    """A fresh normaliser per call: a name is built, an instance is a template and deep-copied
    (each layer learns its own σ; a shared instance would tie them). ``num_heads`` (attention
    layers) goes to normalisers with per-head parameters; vision attention is never causal."""
    if isinstance(spec, Normalizer):
        if options:
            raise ValueError(
                f"normalizer options {dict(options)} given with a {type(spec).__name__} "
                "instance: pass the name instead (normalizer='multimax', normalizer_options=...) "
                "or build the instance with those options"
            )
        normalizer = copy.deepcopy(spec)
    else:
        heads = {} if num_heads is None else attention_layer_options(spec or "softmax", num_heads)
        normalizer = build_normalizer(spec, **dict(options or {}), **heads)
    if num_heads is not None:
        check_causal_use(normalizer, is_causal=False)
    return normalizer


@torch.fx.wrap
def normalized_attention(
    layer: NormalizedAttention,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
) -> Tensor:
    """``multimax.attention`` for ``layer``'s normaliser, recording the path ``impl`` took in
    ``layer.attention_path`` (eager calls only).

    One opaque call for symbolic tracers (``torch.fx.wrap`` here, timm's notrace registry
    below): the path choice branches on shapes, devices and autograd state, which FX feature
    extraction cannot trace."""
    dropout_p = layer.attn_drop.p if layer.training else 0.0
    if not torch.compiler.is_compiling():
        key = (layer.training, torch.is_grad_enabled(), q.dtype, q.device.type, q.shape)
        if key != layer._path_key:  # the choice depends on these only: resolve on change
            layer.attention_path = layer.resolve_path(q, k, v, dropout_p, is_causal)
            layer._path_key = key
    return multimax.attention(
        q,
        k,
        v,
        layer.normalizer,
        mask=attn_mask,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=layer.scale,
        impl=layer.attention_impl,
    )


register_notrace_function(normalized_attention)


class NormalizedAttention(Attention):
    """timm's multi-head self-attention with the weights computed by any normaliser.

    Same projections (and parameter names) as :class:`timm.layers.Attention`; the
    scores-to-output step is :func:`multimax.attention` with this layer's ``normalizer``
    module (one σ per layer, shared by its heads). ``attention_path`` names the path that
    ``attention_impl`` resolved to in the last eager forward.

    A plain importable class (models pickle by reference to it): timm's ``attn_layer`` hook
    builds every layer with the defaults, :class:`GapVisionTransformer` then gives each layer
    its normaliser through :meth:`use_normalizer`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        normalizer: str | Normalizer | None = "softmax",
        normalizer_options: Mapping[str, Any] | None = None,
        attention_impl: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.normalizer = _build(normalizer, normalizer_options, num_heads)
        self.attention_impl = attention_impl
        self.attention_path: str | None = None
        self._path_key: tuple | None = None

    def use_normalizer(self, normalizer: Normalizer, attention_impl: str = "auto") -> None:
        """Replace this layer's normaliser (moved to the layer's device) and path choice."""
        self.normalizer = normalizer.to(self.qkv.weight.device)
        self.attention_impl = attention_impl
        self.attention_path, self._path_key = None, None

    def resolve_path(
        self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool = False
    ) -> str:
        """The path :func:`multimax.attention` takes for these inputs (without a mask)."""
        if self.attention_impl != "auto":
            return self.attention_impl
        inputs = AttentionInputs(
            q, k, v, self.normalizer, None, None, is_causal, dropout_p, self.scale
        )
        return select_path(inputs)

    def __prepare_scriptable__(self) -> NormalizedAttention:
        raise RuntimeError(
            "NormalizedAttention cannot be TorchScript-compiled (its path choice is Python, and "
            "torch.jit.script is deprecated): use torch.compile(model) or torch.export instead"
        )

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = normalized_attention(self, q, k, v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class GapVisionTransformer(VisionTransformer):
    """timm's VisionTransformer plus an ``output_normalizer`` module for its logits.

    ``normalizer`` / ``output_normalizer``: a registry name (built with its ``*_options``) or a
    :class:`~multimax.Normalizer` instance, which is a template: every attention layer and the
    output layer get their own deep copy.
    """

    def __init__(
        self,
        *,
        normalizer: str | Normalizer | None = "softmax",
        normalizer_options: Mapping[str, Any] | None = None,
        output_normalizer: str | Normalizer | None = None,
        output_normalizer_options: Mapping[str, Any] | None = None,
        attention_impl: str = "auto",
        sigma_init: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        sigma_init = sigma_init or {}
        if output_normalizer is None:  # the attention's, where its rows are a distribution
            output_normalizer = default_output_normalizer(normalizer)
        if output_normalizer_options is None and output_normalizer == normalizer:
            output_normalizer_options = normalizer_options
        super().__init__(attn_layer=NormalizedAttention, **kwargs)
        attn_init = _sigma_init_options(normalizer, sigma_init.get("attention"))
        for layer in self.modules():
            if isinstance(layer, NormalizedAttention):
                options = {**(normalizer_options or {}), **attn_init}
                layer.use_normalizer(_build(normalizer, options, layer.num_heads), attention_impl)
        if not isinstance(output_normalizer, Normalizer):
            check_output_normalizer(output_normalizer or "softmax", "output_normalizer")
        out_init = _sigma_init_options(output_normalizer, sigma_init.get("output"))
        self.output_normalizer = _build(
            output_normalizer, {**(output_normalizer_options or {}), **out_init}
        )

    def predict_proba(self, x: Tensor) -> Tensor:
        """The predictive distribution: ``output_normalizer(logits)`` (MultiMax(z), ...)."""
        return self.output_normalizer(self(x))

    def ranking_scores(self, logits: Tensor) -> Tensor:
        """Scores ordered as the predictive distribution, without its ties at zero (top-k)."""
        return self.output_normalizer.transform(logits.float())

    def attention_paths(self) -> list[str]:
        """Distinct attention paths the layers used in their last eager forward."""
        paths = [m.attention_path for m in self.modules() if isinstance(m, NormalizedAttention)]
        return sorted({p for p in paths if p is not None})


def _cfg(input_size: tuple[int, int, int] = (3, 224, 224), **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": input_size,
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,  # learned position embedding of one grid size, as timm's ViT
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "deit_tiny_gap_patch16_224": _cfg(),
        "deit_small_gap_patch16_224": _cfg(),
        "deit_smoke_gap_patch4_16": _cfg(input_size=(3, 16, 16), num_classes=10, crop_pct=1.0),
    }
)

_GAP = {"class_token": False, "global_pool": "avg", "fc_norm": False}


def _create(variant: str, pretrained: bool, arch: dict[str, Any], **kwargs: Any):
    if pretrained:  # a trained run's weights: its checkpoint or an export (timm_checkpoints.py)
        kwargs = saved_model_args(variant, kwargs)
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's ViT
    model = build_model_with_cfg(
        GapVisionTransformer,
        variant,
        pretrained=pretrained,
        feature_cfg={"out_indices": out_indices, "feature_cls": "getter"},
        **{**arch, **_GAP, **kwargs},
    )
    if pretrained:  # what timm.create_model records for save_for_hf: the recorded ones too
        runtime = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")
        model._model_args = {k: v for k, v in kwargs.items() if k not in runtime}
    return model


@register_model
def deit_tiny_gap_patch16_224(pretrained: bool = False, **kwargs: Any) -> GapVisionTransformer:
    """DeiT-tiny with global average pooling (5.7M parameters)."""
    arch = {"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3}
    return _create("deit_tiny_gap_patch16_224", pretrained, arch, **kwargs)


@register_model
def deit_small_gap_patch16_224(pretrained: bool = False, **kwargs: Any) -> GapVisionTransformer:
    """DeiT-small with global average pooling (22M parameters)."""
    arch = {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6}
    return _create("deit_small_gap_patch16_224", pretrained, arch, **kwargs)


@register_model
def deit_smoke_gap_patch4_16(pretrained: bool = False, **kwargs: Any) -> GapVisionTransformer:
    """A 4-layer, 64-dim DeiT-GAP for 16×16 images: smoke runs on a CPU in minutes."""
    arch = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4}
    arch["num_classes"] = 10
    return _create("deit_smoke_gap_patch4_16", pretrained, arch, **kwargs)


def create_model_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], use_ema: bool = False, **overrides: Any
) -> nn.Module:
    """The model a checkpoint (a path or a loaded dict) was saved from, in eval mode, on the
    CPU; ``overrides`` replace recorded model arguments (e.g. ``attention_impl``)."""
    state = checkpoint
    if not isinstance(checkpoint, Mapping):
        state = load_checkpoint_file(checkpoint)
    card = read_model_card(state)
    model = timm.create_model(
        card[ARCHITECTURE_KEY],
        pretrained_cfg_overlay=dict(card[PRETRAINED_CFG_KEY]),
        **{**card[MODEL_ARGS_KEY], **overrides},
    )
    model.load_state_dict(checkpoint_weights(state, use_ema))
    return model.eval()


__all__ = [
    "MODEL_NAMES",
    "create_model_from_checkpoint",
    "GapVisionTransformer",
    "NormalizedAttention",
    "deit_small_gap_patch16_224",
    "deit_smoke_gap_patch4_16",
    "deit_tiny_gap_patch16_224",
]

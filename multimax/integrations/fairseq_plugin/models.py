"""fairseq models ``multimax_transformer`` and ``multimax_transformer_lm``, and every one of
fairseq's ``transformer`` / ``transformer_lm`` architectures under a ``multimax_`` prefix
(``multimax_transformer_iwslt_de_en``, ``multimax_transformer_wmt_en_de``,
``multimax_transformer_lm_wiki103``, ...): same hyper-parameters as fairseq's architecture
of the same name, plus the plugin's options (``options.py``) defaulting to softmax.

Both models remember the update count fairseq hands them (``set_num_updates``), and apply
``--output-sigma-grad-scale``: the output σ's gradient grows like √V (a sum over the whole
vocabulary), so under global ``--clip-norm`` it dominates the norm and shrinks the
backbone's steps; ``inv_sqrt_vocab`` multiplies it by 1/√V (the authors' practice).
Adam's step is invariant to that scale, so only the clipping changes.
"""

from __future__ import annotations

import math
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass

import torch
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    ARCH_MODEL_NAME_REGISTRY,
    ARCH_MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerConfig, TransformerModel
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
)
from omegaconf import OmegaConf

from .layers import MultimaxTransformerDecoder, MultimaxTransformerEncoder
from .options import MultimaxConfig, MultimaxOptions, set_default_options

PREFIX = "multimax_"


class _PluginModelMixin:
    """What both plugin models add to fairseq's: the update count, the output σ's gradient
    scale."""

    num_updates: int | None = None

    def set_num_updates(self, num_updates: int) -> None:
        self.num_updates = num_updates
        super().set_num_updates(num_updates)

    def scale_output_sigma_gradient(self, options: MultimaxOptions) -> None:
        if options.output_sigma_grad_scale == "none":
            return
        decoder = self.decoder
        scale = 1.0 / math.sqrt(len(decoder.dictionary))
        for param in decoder.output_normalizer.parameters():
            param.register_hook(lambda grad, s=scale: grad * s)


@register_model("multimax_transformer")
class MultimaxTransformerModel(_PluginModelMixin, TransformerModel):
    """fairseq's ``transformer`` with every attention and the output layer normalised by
    ``--attn-normalizer`` / ``--output-normalizer``."""

    @classmethod
    def add_args(cls, parser) -> None:
        super().add_args(parser)
        gen_parser_from_dataclass(parser, MultimaxConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            # fairseq's TransformerConfig.from_namespace keeps extra options of a Namespace only
            args = Namespace(**OmegaConf.to_container(args, resolve=True))
        set_default_options(args)
        options = MultimaxOptions.from_args(args)  # fail on a bad name before building
        model = super().build_model(args, task)
        model.scale_output_sigma_gradient(options)
        return model

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return MultimaxTransformerEncoder(
            args, src_dict, embed_tokens, options=MultimaxOptions.from_args(args)
        )

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        return MultimaxTransformerDecoder(
            args,
            tgt_dict,
            embed_tokens,
            no_encoder_attn=cfg.no_cross_attention,
            options=MultimaxOptions.from_args(args),
        )


@dataclass
class MultimaxTransformerLanguageModelConfig(TransformerLanguageModelConfig, MultimaxConfig):
    """``transformer_lm``'s options plus the plugin's."""


@register_model("multimax_transformer_lm", dataclass=MultimaxTransformerLanguageModelConfig)
class MultimaxTransformerLanguageModel(_PluginModelMixin, TransformerLanguageModel):
    """fairseq's ``transformer_lm`` with every causal attention and the output layer
    normalised by ``--attn-normalizer`` / ``--output-normalizer``."""

    @classmethod
    def build_model(cls, args, task):
        """fairseq's ``build_model``, then the same decoder rebuilt from our layers.

        ``TransformerLanguageModel.build_model`` names its decoder class directly (no hook),
        so the stock model is built first (embeddings, adaptive input and all) and its decoder
        is replaced by ours, built on a forked RNG and loaded with the stock decoder's initial
        weights: with the same seed, initial weights and the RNG stream afterwards (dropout)
        are exactly those of ``transformer_lm``.
        """
        options = MultimaxOptions.from_args(args)
        stock = super().build_model(args, task)
        with torch.random.fork_rng(devices=[]):
            decoder = MultimaxTransformerDecoder(
                args,
                task.target_dictionary,
                stock.decoder.embed_tokens,
                no_encoder_attn=True,
                options=options,
            )
        result = decoder.load_state_dict(stock.decoder.state_dict(), strict=False)
        extra = [k for k in result.missing_keys if not _is_normalizer_key(k)]
        if extra or result.unexpected_keys:
            raise RuntimeError(
                f"multimax decoder does not mirror fairseq's: missing {extra}, "
                f"unexpected {result.unexpected_keys}"
            )
        model = cls(decoder)
        model.scale_output_sigma_gradient(options)
        return model


def _is_normalizer_key(key: str) -> bool:
    return any(part.endswith("normalizer") for part in key.split("."))


def _with_plugin_defaults(arch_fn: Callable) -> Callable:
    def architecture(args) -> None:
        arch_fn(args)
        set_default_options(args)

    architecture.__name__ = PREFIX + arch_fn.__name__
    architecture.__doc__ = f"fairseq's ``{arch_fn.__name__}`` plus the plugin's defaults."
    return architecture


def register_prefixed_architectures(stock_model: str, model: str) -> list[str]:
    """Register ``multimax_<arch>`` for ``model`` for every architecture fairseq has registered
    for ``stock_model``; returns the new names."""
    names = []
    for arch, model_name in list(ARCH_MODEL_NAME_REGISTRY.items()):
        if model_name != stock_model or arch.startswith(PREFIX):
            continue
        name = PREFIX + arch
        if name in ARCH_MODEL_REGISTRY:  # the model's own name (a dataclass model's no-op)
            continue
        register_model_architecture(model, name)(_with_plugin_defaults(ARCH_CONFIG_REGISTRY[arch]))
        names.append(name)
    return names


ARCHITECTURES = register_prefixed_architectures("transformer", "multimax_transformer")
ARCHITECTURES += register_prefixed_architectures("transformer_lm", "multimax_transformer_lm")

__all__ = [
    "ARCHITECTURES",
    "MultimaxTransformerLanguageModel",
    "MultimaxTransformerLanguageModelConfig",
    "MultimaxTransformerModel",
    "register_prefixed_architectures",
]

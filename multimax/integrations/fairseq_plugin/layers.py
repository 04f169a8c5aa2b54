"""fairseq's transformer layers, encoder and decoder with MultiMax attention and output.

Only fairseq's own hooks are overridden: ``build_self_attention`` / ``build_encoder_attention``
in the layers, ``build_encoder_layer`` / ``build_decoder_layer`` in the stacks, and the
decoder's ``get_normalized_probs_scriptable``. Everything else (embeddings, layer norms,
feed-forward blocks, forward passes, incremental decoding) is fairseq's code, running as is.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from multimax import Normalizer
from multimax.output_layer import linear_sigma_cross_entropy, supports_fused_output

from .attention import MultimaxMultiheadAttention, name_dropout_after
from .optim import exempt_from_weight_decay
from .options import MultimaxOptions

# Beam search must never see -inf or NaN from the model: a zero-probability token scores this.
SEARCH_LOG_PROB_FLOOR = -1.0e4


def _check_no_xformers(config) -> None:
    if getattr(config, "xformers_att_config", None):
        raise NotImplementedError("xFormers attention cannot be combined with the multimax plugin")


class MultimaxTransformerEncoderLayer(TransformerEncoderLayerBase):
    """fairseq's encoder layer; its self-attention uses the plugin's normaliser."""

    def __init__(self, cfg: TransformerConfig, options: MultimaxOptions, return_fc: bool = False):
        self.multimax_options = options  # read by build_self_attention inside super().__init__
        super().__init__(cfg, return_fc=return_fc)
        name_dropout_after(self, TransformerEncoderLayerBase)

    def build_self_attention(self, embed_dim: int, cfg: TransformerConfig):
        _check_no_xformers(cfg.encoder)
        return MultimaxMultiheadAttention(
            embed_dim,
            cfg.encoder.attention_heads,
            normalizer=self.multimax_options.build_attention_normalizer(
                cfg.encoder.attention_heads, role="encoder_self"
            ),
            attention_impl=self.multimax_options.attention_impl,
            dropout=cfg.attention_dropout,
            self_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


class MultimaxTransformerDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer; causal self- and encoder-decoder attention use the plugin's
    normaliser (one instance each)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        options: MultimaxOptions,
        no_encoder_attn: bool = False,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
    ):
        self.multimax_options = options  # read by the build_* hooks inside super().__init__
        super().__init__(
            cfg,
            no_encoder_attn=no_encoder_attn,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
        )
        name_dropout_after(self, TransformerDecoderLayerBase)

    def build_self_attention(
        self, embed_dim: int, cfg: TransformerConfig, add_bias_kv=False, add_zero_attn=False
    ):
        _check_no_xformers(cfg.decoder)
        return MultimaxMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            normalizer=self.multimax_options.build_attention_normalizer(
                cfg.decoder.attention_heads,
                causal=not cfg.cross_self_attention,
                role="decoder_self",
            ),
            incremental_normalizer=self.multimax_options.build_incremental_normalizer(),
            attention_impl=self.multimax_options.attention_impl,
            dropout=cfg.attention_dropout,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=not cfg.cross_self_attention,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim: int, cfg: TransformerConfig):
        _check_no_xformers(cfg.encoder)
        return MultimaxMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            normalizer=self.multimax_options.build_attention_normalizer(
                cfg.decoder.attention_heads, role="cross"
            ),
            incremental_normalizer=self.multimax_options.build_incremental_normalizer(),
            attention_impl=self.multimax_options.attention_impl,
            kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim,
            dropout=cfg.attention_dropout,
            encoder_decoder_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


def _wrap_layer(layer: nn.Module, cfg: TransformerConfig) -> nn.Module:
    """Activation checkpointing and FSDP wrapping, as fairseq's build_*_layer apply them."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class MultimaxTransformerEncoder(TransformerEncoder):
    """fairseq's encoder built from :class:`MultimaxTransformerEncoderLayer`."""

    def __init__(self, args, dictionary, embed_tokens, *, options: MultimaxOptions, **kwargs):
        self.multimax_options = options  # read by build_encoder_layer inside super().__init__
        super().__init__(args, dictionary, embed_tokens, **kwargs)
        name_dropout_after(self, TransformerEncoder)

    def build_encoder_layer(self, args):
        cfg = TransformerConfig.from_namespace(args)
        layer = MultimaxTransformerEncoderLayer(cfg, self.multimax_options, self.return_fc)
        return _wrap_layer(layer, cfg)


def output_log_probs(normalizer: Normalizer, logits: Tensor, for_search: bool) -> Tensor:
    """log normalizer(logits) in float32, along the vocabulary.

    Softmax-family normalisers (softmax with a temperature, MultiMax) use ``log_softmax`` of
    the transformed logits; the others take the log of their probabilities, so an exact zero
    (sparsemax, 1.5-entmax, evsoftmax at evaluation) is ``-inf``. ``for_search`` floors the
    result at :data:`SEARCH_LOG_PROB_FLOOR` and maps NaN there, for beam search.
    """
    logits = logits.float()
    if normalizer.mapping == "softmax":
        log_probs = torch.log_softmax(normalizer.transform(logits), dim=-1)
    else:
        log_probs = normalizer(logits).log()
    if for_search:
        log_probs = torch.nan_to_num(
            log_probs, nan=SEARCH_LOG_PROB_FLOOR, neginf=SEARCH_LOG_PROB_FLOOR
        ).clamp_min(SEARCH_LOG_PROB_FLOOR)
    return log_probs


class MultimaxTransformerDecoder(TransformerDecoder):
    """fairseq's decoder built from :class:`MultimaxTransformerDecoderLayer`, with
    ``output_normalizer`` applied to the vocabulary logits in ``get_normalized_probs``.

    With a plain softmax output (and with adaptive softmax, which only a softmax output may
    use) ``get_normalized_probs`` is fairseq's own.
    """

    def __init__(
        self,
        args,
        dictionary,
        embed_tokens,
        no_encoder_attn: bool = False,
        output_projection=None,
        *,
        options: MultimaxOptions,
    ):
        self.multimax_options = options  # read by build_decoder_layer inside super().__init__
        super().__init__(
            args,
            dictionary,
            embed_tokens,
            no_encoder_attn=no_encoder_attn,
            output_projection=output_projection,
        )
        name_dropout_after(self, TransformerDecoder)
        self.output_normalizer = exempt_from_weight_decay(options.build_output_normalizer())
        if self.adaptive_softmax is not None and not self.output_normalizer.is_plain_softmax:
            raise ValueError(
                f"--output-normalizer {options.output_normalizer!r} cannot be combined with "
                "adaptive softmax (--adaptive-softmax-cutoff, set by the *_wiki103 / *_gbw "
                "architectures): adaptive softmax is a softmax factorisation. Use "
                "--arch multimax_transformer_lm (full vocabulary output, the paper's setting), "
                "or --output-normalizer softmax."
            )

    def build_decoder_layer(self, args, no_encoder_attn: bool = False):
        cfg = TransformerConfig.from_namespace(args)
        layer = MultimaxTransformerDecoderLayer(cfg, self.multimax_options, no_encoder_attn)
        return _wrap_layer(layer, cfg)

    def fuses_output_loss(self) -> bool:
        """Whether :meth:`output_loss` can take σ + cross-entropy straight from the features,
        without the logits: the output normaliser is softmax of a point-wise σ other than
        plain softmax (MultiMax, V2, softmax with a temperature) and the output layer is the
        plain ``output_projection`` (no adaptive softmax). Softmax outputs stay fairseq's own."""
        return (
            self.adaptive_softmax is None
            and not self.output_normalizer.is_plain_softmax
            and supports_fused_output(self.output_normalizer)
            and isinstance(self.output_projection, nn.Linear)
        )

    def output_loss(
        self,
        features: Tensor,
        target: Tensor,
        *,
        label_smoothing: float,
        ignore_index: int,
        reduction: str,
    ) -> tuple[Tensor, Tensor]:
        """(loss, per-token −log p(target)) of the output normaliser on
        ``output_projection(features)``, by :func:`multimax.linear_sigma_cross_entropy`:
        the (tokens, vocabulary) logits are never formed. Only when :meth:`fuses_output_loss`."""
        projection = self.output_projection
        return linear_sigma_cross_entropy(
            features,
            projection.weight,
            target,
            self.output_normalizer,
            projection.bias,
            label_smoothing=label_smoothing,
            ignore_index=ignore_index,
            reduction=reduction,
        )

    def get_normalized_probs_scriptable(self, net_output, log_probs: bool, sample=None):
        """The output normaliser's distribution over the vocabulary.

        ``sample is None`` is fairseq's sequence generator asking (beam search): log-probs are
        floored there (:func:`output_log_probs`). Scoring (``eval-lm``, ``score``) passes the
        sample and gets exact log-probs, ``-inf`` included.
        """
        if self.adaptive_softmax is not None or self.output_normalizer.is_plain_softmax:
            return super().get_normalized_probs_scriptable(net_output, log_probs, sample)
        logits = net_output[0]
        if log_probs:
            return output_log_probs(self.output_normalizer, logits, for_search=sample is None)
        return self.output_normalizer(logits.float())


__all__ = [
    "SEARCH_LOG_PROB_FLOOR",
    "MultimaxTransformerDecoder",
    "MultimaxTransformerDecoderLayer",
    "MultimaxTransformerEncoder",
    "MultimaxTransformerEncoderLayer",
    "output_log_probs",
]

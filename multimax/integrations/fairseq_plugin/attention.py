"""fairseq's ``MultiheadAttention`` computing through :func:`multimax.attention`.

Same projections, same state-dict keys (plus ``normalizer.*`` for a normaliser with parameters),
same incremental-state layout (``prev_key`` / ``prev_value``: (B, H, S, D),
``prev_key_padding_mask``: (B, S)), so fairseq's beam search reorders the cache with the
inherited ``reorder_incremental_state``. Masks keep fairseq's meaning: ``key_padding_mask``
is 1 / True at padding; ``attn_mask`` (T, S) is additive (float, ``-inf`` = masked, added
*after* the normaliser's transform) or boolean / byte with True = masked. fairseq's
future mask (``triu(-inf, 1)``) is recognised and passed on as ``is_causal=True`` so that
the fastest path that supports causality can run.

``incremental_normalizer`` (None by default) replaces ``normalizer`` whenever fairseq calls with
an incremental state (the decoder in beam search): a plain softmax there is what the authors'
fairseq code computes, since its σ runs only in fairseq's non-incremental fast path
(``--incremental-normalizer softmax``, docs/fidelity.md).
"""

from __future__ import annotations

import torch
from fairseq.modules import FairseqDropout, MultiheadAttention
from torch import Tensor, nn

import multimax
from multimax import Normalizer
from multimax.tensor_cache import TensorCache

from .optim import exempt_from_weight_decay

IncrementalState = dict[str, dict[str, Tensor | None]]
_KEEP_MASKS = TensorCache(8)


def name_dropout_after(module: nn.Module, stock: type[nn.Module]) -> None:
    """Give ``module``'s own :class:`FairseqDropout` modules the name the ``stock`` fairseq
    class gives its own.

    fairseq names each dropout after the class that builds it (``self.__class__.__name__``);
    ``fairseq-generate --retain-dropout --retain-dropout-modules TransformerEncoder ...``
    (Monte Carlo dropout) selects by that name, so the plugin's subclasses answer to the
    stock names: TransformerEncoder, TransformerDecoder, TransformerEncoderLayerBase,
    TransformerDecoderLayerBase, MultiheadAttention.
    """
    for child in module.children():
        if isinstance(child, FairseqDropout):
            child.module_name = stock.__name__


class MultimaxMultiheadAttention(MultiheadAttention):
    """Multi-head attention whose weights are ``normalizer(q·kᵀ/√d + mask)``.

    ``normalizer``: one instance per attention layer, its parameters shared by the heads.
    ``attention_impl``: ``"auto"`` or a path name of ``multimax.ATTENTION_PATHS``.
    ``incremental_normalizer``: used instead of ``normalizer`` in incremental decoding (None:
    ``normalizer`` there too), e.g. a plain softmax, which has no parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        normalizer: Normalizer,
        attention_impl: str = "auto",
        incremental_normalizer: Normalizer | None = None,
        **kwargs,
    ) -> None:
        for unsupported in ("add_bias_kv", "add_zero_attn", "xformers_att_config"):
            if kwargs.get(unsupported):
                raise NotImplementedError(
                    f"MultimaxMultiheadAttention does not support {unsupported}; "
                    "fairseq's transformer and transformer_lm architectures do not use it"
                )
        super().__init__(embed_dim, num_heads, **kwargs)
        name_dropout_after(self, MultiheadAttention)
        self.normalizer = exempt_from_weight_decay(normalizer)
        self.incremental_normalizer = incremental_normalizer
        self.attention_impl = attention_impl
        self._causal_cache: tuple[tuple, Tensor] | None = None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, impl={self.attention_impl}"

    # --- masks ------------------------------------------------------------------------

    def _is_future_mask(self, mask: Tensor) -> bool:
        """True for fairseq's additive causal mask ``triu(-inf, diagonal=1)`` of shape (T, T).

        The answer is cached per tensor storage and version (the decoder reuses one buffer),
        so the check syncs with the device once, not at every layer and step.
        """
        if not mask.is_floating_point() or mask.dim() != 2 or mask.size(0) != mask.size(1):
            return False
        key = (mask.data_ptr(), tuple(mask.shape), mask.stride(), mask._version, mask.device)
        if self._causal_cache is not None and self._causal_cache[0][:-1] == key:
            return bool(self._causal_cache[0][-1])
        expected = torch.full_like(mask, float("-inf")).triu(1)
        answer = torch.equal(mask, expected)
        # Holding the tensor keeps its storage alive, so the pointer cannot be reused meanwhile.
        self._causal_cache = ((*key, answer), mask)
        return answer

    def _attention_mask(
        self, key_padding_mask: Tensor | None, attn_mask: Tensor | None, dtype: torch.dtype
    ) -> tuple[Tensor | None, bool]:
        """(mask for ``multimax.attention``, is_causal): bool (B|1, 1, T|1, S) with
        True = keep, or an additive float mask when ``attn_mask`` is a general additive one."""
        keep = None
        if key_padding_mask is not None:
            # one keep mask per padding mask, shared by every layer that gets it, so that
            # masks derived from it downstream (flex's block mask) are built once per batch
            keep = _KEEP_MASKS.get(
                [key_padding_mask], (), lambda: ~key_padding_mask.to(torch.bool)[:, None, None, :]
            )
        if attn_mask is None:
            return keep, False
        if self._is_future_mask(attn_mask):
            return keep, True
        if not attn_mask.is_floating_point():
            attn_keep = ~attn_mask.to(torch.bool)[None, None]
            return (attn_keep if keep is None else keep & attn_keep), False
        additive = attn_mask.to(dtype)[None, None]
        if keep is not None:
            additive = additive.masked_fill(~keep, float("-inf"))
        return additive, False

    # --- forward ----------------------------------------------------------------------

    def _split_heads(self, x: Tensor) -> Tensor:
        """(L, B, H·D) -> (B, H, L, D)."""
        length, batch, _ = x.shape
        return x.view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None = None,
        incremental_state: IncrementalState | None = None,
        need_weights: bool = True,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Input (T, B, C) as fairseq's; returns (output (T, B, C), weights or None).

        Weights, when asked for, are (B, T, S) averaged over heads, or (H, B, T, S) with
        ``need_head_weights``, as fairseq returns them.
        """
        if before_softmax:
            raise NotImplementedError("before_softmax has no meaning for a general normaliser")
        need_weights = need_weights or need_head_weights
        tgt_len, bsz, _ = query.shape

        saved_state = None
        if incremental_state is not None:
            saved_state = self._get_input_buffer(incremental_state)
            if "prev_key" in saved_state and static_kv:
                # encoder-decoder keys and values are cached: no need to project them again
                key = value = None

        q = self._split_heads(self.q_proj(query))
        k = v = None
        if self.self_attention:
            k = self._split_heads(self.k_proj(query))
            v = self._split_heads(self.v_proj(query))
        elif key is not None:
            if self.encoder_decoder_attention and self.beam_size > 1 and bsz == key.size(1):
                # beamable enc-dec attention: one copy of the source per sentence, not per beam
                key = key.view(key.size(0), -1, self.beam_size, key.size(2))[:, :, 0, :]
                if key_padding_mask is not None:
                    key_padding_mask = key_padding_mask.view(
                        -1, self.beam_size, key_padding_mask.size(1)
                    )[:, 0, :]
            k = self._split_heads(self.k_proj(key))
            v = self._split_heads(self.v_proj(key if self.encoder_decoder_attention else value))

        if saved_state is not None:
            if "prev_key" in saved_state:
                prev_key, prev_value = saved_state["prev_key"], saved_state["prev_value"]
                assert prev_key is not None and prev_value is not None
                if static_kv or k is None:
                    k, v = prev_key, prev_value
                else:
                    k = torch.cat([prev_key, k], dim=2)
                    v = torch.cat([prev_value, v], dim=2)
            assert k is not None and v is not None
            key_padding_mask = MultiheadAttention._append_prev_key_padding_mask(
                key_padding_mask=key_padding_mask,
                prev_key_padding_mask=saved_state.get("prev_key_padding_mask"),
                batch_size=k.size(0),
                src_len=k.size(2),
                static_kv=static_kv,
            )
            saved_state["prev_key"] = k
            saved_state["prev_value"] = v
            saved_state["prev_key_padding_mask"] = key_padding_mask
            self._set_input_buffer(incremental_state, saved_state)
        assert k is not None and v is not None
        if key_padding_mask is not None and key_padding_mask.dim() == 0:
            key_padding_mask = None  # fairseq's scripting workaround for "no mask"

        kv_bsz = k.size(0)
        beams = bsz // kv_bsz
        if beams > 1:
            # several beams share one source: fold them into the query length
            q = q.reshape(kv_bsz, beams, self.num_heads, tgt_len, self.head_dim)
            q = q.transpose(1, 2).reshape(kv_bsz, self.num_heads, beams * tgt_len, self.head_dim)
            if attn_mask is not None:
                attn_mask = attn_mask.repeat(beams, 1)

        normalizer = self.normalizer
        if saved_state is not None and self.incremental_normalizer is not None:
            normalizer = self.incremental_normalizer
        mask, is_causal = self._attention_mask(key_padding_mask, attn_mask, q.dtype)
        if normalizer.causal_only and self.self_attention and saved_state is not None:
            is_causal = True  # a decoding step: its queries are the newest positions (no mask)
        dropout_p = (
            self.dropout_module.p
            if self.training or self.dropout_module.apply_during_inference
            else 0.0
        )
        out = multimax.attention(
            q,
            k,
            v,
            normalizer,
            mask=mask,
            is_causal=is_causal,
            dropout_p=dropout_p,
            scale=self.scaling,
            impl=self.attention_impl,
        )
        weights = None
        if need_weights:
            # Weights (before dropout, as fairseq returns them) from the reference path. The
            # output above still comes from multimax.attention, so the fastest path runs and
            # record_attention() sees this call; the scores are computed twice only here.
            _, weights = multimax.attention_with_weights(
                q, k, v, normalizer, mask=mask, is_causal=is_causal, scale=self.scaling
            )

        if beams > 1:
            out = out.reshape(kv_bsz, self.num_heads, beams, tgt_len, self.head_dim)
            out = out.transpose(1, 2).reshape(bsz, self.num_heads, tgt_len, self.head_dim)
            if weights is not None:
                src_len = weights.size(-1)
                weights = weights.reshape(kv_bsz, self.num_heads, beams, tgt_len, src_len)
                weights = weights.transpose(1, 2).reshape(bsz, self.num_heads, tgt_len, src_len)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, self.embed_dim)
        out = self.out_proj(out)
        if weights is not None:
            weights = weights.float().transpose(0, 1)  # (H, B, T, S), as fairseq returns
            if not need_head_weights:
                weights = weights.mean(dim=0)
        return out, weights


_ROLE_NAMES = {"encoder_self": "encoder self-attention", "decoder_self": "decoder self-attention",
               "cross": "cross-attention"}  # fmt: skip


def attention_role(module_name: str) -> str:
    """``encoder_self``, ``decoder_self`` or ``cross`` for an attention module's name in a
    fairseq transformer (``encoder.layers.0.self_attn``, ``decoder.layers.1.encoder_attn``)."""
    if module_name.endswith("encoder_attn"):
        return "cross"
    return "encoder_self" if module_name.startswith("encoder.") else "decoder_self"


def _name(normalizer: Normalizer) -> str:
    return getattr(normalizer, "registry_name", type(normalizer).__name__.lower())


def sigma_placement(model: nn.Module) -> list[str]:
    """Which normaliser acts where in a model built by the plugin, one line per kind of
    attention (``encoder self-attention: multimax in 6 layers``, plus ``; beam search:
    softmax`` where incremental decoding uses another) and one for the output layer."""
    seen: dict[str, dict[tuple[str, str], int]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MultimaxMultiheadAttention):
            kinds = seen.setdefault(attention_role(module_name), {})
            incremental = module.incremental_normalizer or module.normalizer
            key = (_name(module.normalizer), _name(incremental))
            kinds[key] = kinds.get(key, 0) + 1
    lines = []
    for role, label in _ROLE_NAMES.items():
        for (normalizer, incremental), count in seen.get(role, {}).items():
            line = f"{label}: {normalizer} in {count} layer{'s' * (count > 1)}"
            if role != "encoder_self" and incremental != normalizer:
                line += f"; beam search: {incremental}"
            lines.append(line)
    output = getattr(getattr(model, "decoder", None), "output_normalizer", None)
    if output is not None:
        lines.append(f"output layer: {_name(output)}")
    return lines


__all__ = ["MultimaxMultiheadAttention", "attention_role", "sigma_placement"]

"""The plugin's command-line options, and the normalisers they build.

    --attn-normalizer NAME     every self-, causal and encoder-decoder attention (default softmax)
    --output-normalizer NAME   the vocabulary distribution (default softmax)
    --multimax-order K         MultiMax's order, any K >= 1 (default 2)
    --softmax-temperature T    softmax(x / T) (default 1)
    --learn-temperature        learn T (stored as log T), one per softmax instance
    --attention-impl IMPL      ``auto`` or a name in ``multimax.ATTENTION_PATHS`` (default auto)
    --output-sigma-grad-scale  ``none`` or ``inv_sqrt_vocab``: scale the output normaliser's
                               parameter gradients by 1/√V (default none, the published setting)
    --attn-normalizer-scope R  the attention kinds ``--attn-normalizer`` acts in, a comma list of
                               ``encoder_self``, ``decoder_self``, ``cross`` (default all three);
                               the others use plain softmax
    --incremental-normalizer   ``same`` or ``softmax``: what the decoder's attention uses in
                               incremental decoding (beam search); ``softmax`` is the authors'
                               code, whose σ runs only outside incremental decoding (default same)
    --attn-sigma-init KIND     σ initialisation of attention / output normalisers, a name in
    --output-sigma-init KIND   ``multimax.modulation.SIGMA_INITS`` (default trunc_normal), with
    --attn-sigma-init-std S    their standard deviations (default 0.02)
    --output-sigma-init-std S

A normaliser option goes to every normaliser that accepts it (``order`` to MultiMax,
``temperature`` / ``learn_temperature`` to softmax), in attention and output alike; this is
``experiments.core.setup.normalizer_options``'s rule too (an output normaliser of another kind gets
its own defaults).
"""

# No ``from __future__ import annotations`` here: fairseq reads the dataclass field types.
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from fairseq.dataclass import FairseqDataclass
from fairseq.utils import safe_getattr

from multimax import ATTENTION_PATHS, NORMALIZERS, Normalizer, build_normalizer
from multimax.modulation import INIT_STD, SIGMA_INITS
from multimax.normalizers import (
    attention_layer_options,
    check_causal_use,
    check_output_normalizer,
)

# CLI option -> keyword argument of the normaliser classes that accept it.
_NORMALIZER_KWARGS = {
    "multimax_order": "order",
    "softmax_temperature": "temperature",
    "learn_temperature": "learn_temperature",
}


@dataclass
class MultimaxConfig(FairseqDataclass):
    """The plugin's options as a fairseq dataclass (fields become ``--attn-normalizer`` ...)."""

    attn_normalizer: str = field(
        default="softmax",
        metadata={"help": "normaliser of every attention layer (multimax.NORMALIZERS name)"},
    )
    output_normalizer: str = field(
        default="softmax",
        metadata={"help": "normaliser of the vocabulary logits (multimax.NORMALIZERS name)"},
    )
    multimax_order: int = field(default=2, metadata={"help": "MultiMax order K (any K >= 1)"})
    softmax_temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature T: softmax(x / T)"}
    )
    learn_temperature: bool = field(
        default=False, metadata={"help": "learn the softmax temperature (one per instance)"}
    )
    attention_impl: str = field(
        default="auto",
        metadata={"help": "attention implementation: auto or a multimax.ATTENTION_PATHS name"},
    )
    output_sigma_grad_scale: str = field(
        default="none",
        metadata={
            "help": "none | inv_sqrt_vocab: multiply the output normaliser's parameter "
            "gradients by 1/sqrt(vocabulary size), so that under --clip-norm they do not "
            "dominate the global gradient norm (Adam's update is invariant to the scale)"
        },
    )
    attn_normalizer_scope: str = field(
        default="encoder_self,decoder_self,cross",
        metadata={
            "help": "comma list of the attention kinds --attn-normalizer acts in "
            "(encoder_self, decoder_self, cross); the others use softmax"
        },
    )
    incremental_normalizer: str = field(
        default="same",
        metadata={
            "help": "same | softmax: the decoder attention's normaliser in incremental "
            "decoding (beam search); softmax reproduces the authors' code"
        },
    )
    attn_sigma_init: str = field(
        default="trunc_normal",
        metadata={
            "help": "σ initialisation in attention: trunc_normal | trunc_normal_timm | zeros"
        },
    )
    attn_sigma_init_std: float = field(
        default=INIT_STD, metadata={"help": "std of the attention σ initialisation"}
    )
    output_sigma_init: str = field(
        default="trunc_normal",
        metadata={
            "help": "σ initialisation of the output layer: trunc_normal | trunc_normal_timm | zeros"
        },
    )
    output_sigma_init_std: float = field(
        default=INIT_STD, metadata={"help": "std of the output layer's σ initialisation"}
    )


OUTPUT_SIGMA_GRAD_SCALES = ("none", "inv_sqrt_vocab")
# The kinds of attention --attn-normalizer-scope chooses among (fairseq's transformer has these).
ATTENTION_ROLES = ("encoder_self", "decoder_self", "cross")
INCREMENTAL_NORMALIZERS = ("same", "softmax")


@dataclass(frozen=True)
class MultimaxOptions:
    """Validated plugin options; builds one fresh normaliser per call."""

    attn_normalizer: str = "softmax"
    output_normalizer: str = "softmax"
    multimax_order: int = 2
    softmax_temperature: float = 1.0
    learn_temperature: bool = False
    attention_impl: str = "auto"
    output_sigma_grad_scale: str = "none"
    attn_normalizer_scope: str = ",".join(ATTENTION_ROLES)
    incremental_normalizer: str = "same"
    attn_sigma_init: str = "trunc_normal"
    attn_sigma_init_std: float = INIT_STD
    output_sigma_init: str = "trunc_normal"
    output_sigma_init_std: float = INIT_STD

    def __post_init__(self) -> None:
        for flag, name in (
            ("--attn-normalizer", self.attn_normalizer),
            ("--output-normalizer", self.output_normalizer),
        ):
            if name not in NORMALIZERS:
                raise ValueError(
                    f"{flag} {name!r} is not a normaliser; valid: {', '.join(NORMALIZERS)}"
                )
        check_output_normalizer(self.output_normalizer, "--output-normalizer")
        if self.attention_impl != "auto" and self.attention_impl not in ATTENTION_PATHS:
            raise ValueError(
                f"--attention-impl {self.attention_impl!r} is unknown; valid: auto, "
                f"{', '.join(ATTENTION_PATHS)}"
            )
        if self.output_sigma_grad_scale not in OUTPUT_SIGMA_GRAD_SCALES:
            raise ValueError(
                f"--output-sigma-grad-scale {self.output_sigma_grad_scale!r} is unknown; "
                f"valid: {', '.join(OUTPUT_SIGMA_GRAD_SCALES)}"
            )
        unknown = [r for r in self.scope if r not in ATTENTION_ROLES]
        if unknown:
            raise ValueError(
                f"--attn-normalizer-scope {self.attn_normalizer_scope!r}: unknown "
                f"{', '.join(unknown)}; a comma list of {', '.join(ATTENTION_ROLES)}"
            )
        if self.incremental_normalizer not in INCREMENTAL_NORMALIZERS:
            raise ValueError(
                f"--incremental-normalizer {self.incremental_normalizer!r} is unknown; "
                f"valid: {', '.join(INCREMENTAL_NORMALIZERS)}"
            )
        for flag, kind in (
            ("--attn-sigma-init", self.attn_sigma_init),
            ("--output-sigma-init", self.output_sigma_init),
        ):
            if kind not in SIGMA_INITS:
                raise ValueError(f"{flag} {kind!r} is unknown; valid: {', '.join(SIGMA_INITS)}")

    @property
    def scope(self) -> tuple[str, ...]:
        """The attention kinds (:data:`ATTENTION_ROLES`) ``--attn-normalizer`` acts in."""
        return tuple(r.strip() for r in self.attn_normalizer_scope.split(",") if r.strip())

    @classmethod
    def from_args(cls, args) -> "MultimaxOptions":
        """From an argparse ``Namespace``, a ``DictConfig`` or a fairseq config object;
        missing or ``None`` entries take the defaults."""
        values = {f.name: safe_getattr(args, f.name, f.default) for f in fields(cls)}
        return cls(**values)

    def normalizer_kwargs(self, name: str) -> dict:
        """The options that normaliser ``name``'s constructor accepts."""
        accepted = inspect.signature(NORMALIZERS[name].__init__).parameters
        values = asdict(self)
        return {
            kwarg: values[option]
            for option, kwarg in _NORMALIZER_KWARGS.items()
            if kwarg in accepted
        }

    def build_attention_normalizer(
        self, num_heads: int | None = None, causal: bool = False, role: str | None = None
    ) -> Normalizer:
        """The normaliser of one attention layer with ``num_heads`` heads (per-head parameters
        where it has them); ``causal``: the layer is a decoder's self-attention; ``role``
        (:data:`ATTENTION_ROLES`): plain softmax where ``role`` is outside the scope."""
        name = self.attn_normalizer if role is None or role in self.scope else "softmax"
        kwargs = self.normalizer_kwargs(name) if name == self.attn_normalizer else {}
        kwargs.update(sigma_init_kwargs(name, self.attn_sigma_init, self.attn_sigma_init_std))
        if num_heads is not None:
            kwargs.update(attention_layer_options(name, num_heads))
        normalizer = build_normalizer(name, **kwargs)
        check_causal_use(normalizer, causal)
        return normalizer

    def build_incremental_normalizer(self) -> Normalizer | None:
        """What a decoder attention uses in incremental decoding instead of its own
        normaliser: None (its own, ``same``) or a plain softmax."""
        return None if self.incremental_normalizer == "same" else build_normalizer("softmax")

    def build_output_normalizer(self) -> Normalizer:
        name = self.output_normalizer
        init = sigma_init_kwargs(name, self.output_sigma_init, self.output_sigma_init_std)
        return build_normalizer(name, **self.normalizer_kwargs(name), **init)


def sigma_init_kwargs(name: str, kind: str, std: float) -> dict:
    """``{init: kind, init_std: std}`` for a normaliser with σ (MultiMax, V2), else {}."""
    accepted = inspect.signature(NORMALIZERS[name].__init__).parameters
    return {"init": kind, "init_std": std} if "init" in accepted else {}


def set_default_options(args) -> None:
    """Architecture-function helper: fill the plugin's options left unset on ``args``."""
    for f in fields(MultimaxOptions):
        if getattr(args, f.name, None) is None:
            setattr(args, f.name, f.default)


def normalizer_cli_args(
    attn_name: str,
    attn_options: Mapping | None = None,
    output_name: str | None = None,
    output_options: Mapping | None = None,
    attention_impl: str = "auto",
) -> list[str]:
    """``fairseq-train`` flags for the given normalisers, e.g. from
    ``experiments.core.setup.normalizer_options(cfg, "attention" | "output")``.

    >>> normalizer_cli_args("multimax", {"order": 1}, "softmax", {})
    ['--attn-normalizer', 'multimax', '--output-normalizer', 'softmax', '--multimax-order', '1', ...]

    Raises ``ValueError`` when the two sets ask for different values of one option (the flags
    are shared by attention and output) or name an option no normaliser here accepts.
    """
    output_name = output_name or attn_name
    merged: dict[str, object] = {}
    for options in (attn_options or {}, output_options or {}):
        for kwarg, value in options.items():
            option = next((o for o, k in _NORMALIZER_KWARGS.items() if k == kwarg), None)
            if option is None:
                raise ValueError(
                    f"normaliser option {kwarg!r} has no fairseq flag; flags exist for "
                    f"{sorted(_NORMALIZER_KWARGS.values())}"
                )
            if option in merged and merged[option] != value:
                raise ValueError(
                    f"attention and output normalisers ask for different {kwarg} "
                    f"({merged[option]!r} vs {value!r}); the fairseq flags are shared"
                )
            merged[option] = value
    opts = MultimaxOptions(
        attn_normalizer=attn_name,
        output_normalizer=output_name,
        attention_impl=attention_impl,
        **merged,  # type: ignore[arg-type]
    )
    flags = [
        "--attn-normalizer",
        opts.attn_normalizer,
        "--output-normalizer",
        opts.output_normalizer,
        "--multimax-order",
        str(opts.multimax_order),
        "--softmax-temperature",
        str(opts.softmax_temperature),
        "--attention-impl",
        opts.attention_impl,
    ]
    if opts.learn_temperature:
        flags.append("--learn-temperature")
    return flags


__all__ = [
    "ATTENTION_ROLES",
    "INCREMENTAL_NORMALIZERS",
    "OUTPUT_SIGMA_GRAD_SCALES",
    "MultimaxConfig",
    "MultimaxOptions",
    "normalizer_cli_args",
    "set_default_options",
    "sigma_init_kwargs",
]

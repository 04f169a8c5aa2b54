"""The plugin's command-line options, and the normalisers they build.

    --attn-normalizer NAME     every self-, causal and encoder-decoder attention (default softmax)
    --output-normalizer NAME   the vocabulary distribution (default softmax)
    --multimax-order K         MultiMax's order, any K >= 1 (default 2)
    --softmax-temperature T    softmax(x / T) (default 1)
    --learn-temperature        learn T (stored as log T), one per softmax instance
    --attention-impl IMPL      ``auto`` or a name in ``multimax.ATTENTION_PATHS`` (default auto)
    --output-sigma-grad-scale  ``none`` or ``inv_sqrt_vocab``: scale the output normaliser's
                               parameter gradients by 1/√V (default none, the published setting)

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


OUTPUT_SIGMA_GRAD_SCALES = ("none", "inv_sqrt_vocab")


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

    def __post_init__(self) -> None:
        for flag, name in (
            ("--attn-normalizer", self.attn_normalizer),
            ("--output-normalizer", self.output_normalizer),
        ):
            if name not in NORMALIZERS:
                raise ValueError(
                    f"{flag} {name!r} is not a normaliser; valid: {', '.join(NORMALIZERS)}"
                )
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

    def build_attention_normalizer(self) -> Normalizer:
        return build_normalizer(
            self.attn_normalizer, **self.normalizer_kwargs(self.attn_normalizer)
        )

    def build_output_normalizer(self) -> Normalizer:
        return build_normalizer(
            self.output_normalizer, **self.normalizer_kwargs(self.output_normalizer)
        )


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
    "OUTPUT_SIGMA_GRAD_SCALES",
    "MultimaxConfig",
    "MultimaxOptions",
    "normalizer_cli_args",
    "set_default_options",
]

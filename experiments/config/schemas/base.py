"""The building blocks of every app's schema (types and sections) and the keys all apps share.

A section refuses keys it does not name (``extra="forbid"``: nothing would read them), checks
types strictly (an integer is not a string, ``true`` is not ``1``; any scalar may stand for a
string) and refuses NaN and infinities. Ranges are ``Field`` bounds, choices ``Literal``s (the
normaliser names are :data:`multimax.NORMALIZERS`'). A field with a default may be absent (the
default is never used: these models only check a config Hydra composed).

Data and model options name the app they belong to in ``kind:`` (``configs/data/*.yaml``,
``configs/model/*.yaml``); the schemas hold each app's ``kind`` as a ``Literal``.

fairseq's own options (``train``, ``evaluate.args``, ``model.args``) are :class:`Passthrough`
sections: the keys typed there are checked here, any other key is fairseq's to judge
(``experiments.config.check`` asks fairseq's parser).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from multimax import ATTENTION_PATHS, NORMALIZERS
from multimax.modulation import SIGMA_INITS
from multimax.normalizers import check_output_normalizer

Text = Annotated[str, Field(strict=False)]  # numbers given for a string are taken as text
PosInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]  # a probability or share
Below1 = Annotated[float, Field(ge=0, lt=1)]  # label smoothing, dropout rates
Epsilon = Annotated[float, Field(gt=0, lt=1)]
JUDGED_BY_FAIRSEQ = "judged_by_fairseq"
NormalizerName = Literal[tuple(NORMALIZERS)]  # type: ignore[valid-type]
AttentionPath = Literal[("auto", *ATTENTION_PATHS)]  # type: ignore[valid-type]
NON_CAUSAL_KINDS = ("vision", "translation")  # model kinds with non-causal attention


def cross(message: str) -> PydanticCustomError:
    """A rule relating two keys, broken: ``message`` is the whole line."""
    return PydanticCustomError("cross", message)


def judged_by_fairseq(description: str) -> Any:
    """A field whose values fairseq's parser judges (when a run's overrides set it)."""
    return Field(description=description, json_schema_extra={JUDGED_BY_FAIRSEQ: True})


class Section(BaseModel):
    """A mapping of the config: only the keys named here."""

    model_config = ConfigDict(
        extra="forbid", strict=True, coerce_numbers_to_str=True, allow_inf_nan=False
    )


class Passthrough(Section):
    """Another tool's options under their own names: keys not named here are that tool's."""

    model_config = ConfigDict(extra="allow")


# --- every app -----------------------------------------------------------------------------------


class Normalizer(Section):
    name: NormalizerName = Field(description="choose it with normalizer=NAME")
    order: PosInt = Field(None, description="MultiMax's order K")
    temperature: Positive = None
    learn_temperature: bool = None


class Logger(Section):
    name: Literal["wandb", "none"] = Field(description="choose it with logger=wandb|none")
    mode: Literal["offline", "online", "disabled"] = None
    project: Text = None
    entity: Text | None = None
    group: Text | None = None
    job_type: Text | None = None
    tags: list[Text] = None
    log_checkpoint: bool = Field(None, description="upload the final checkpoint as an artifact")
    flush_every_seconds: Positive = Field(None, description="how often W&B writes its run file")


class Profile(Section):
    name: Literal["paper", "smoke"] = Field(description="choose it with profile=paper|smoke")


SigmaInitKind = Literal[SIGMA_INITS]  # type: ignore[valid-type]
AttentionRole = Literal["encoder_self", "decoder_self", "cross"]


class SigmaInit(Section):
    kind: SigmaInitKind = Field(description="how σ's scalars are drawn (multimax.modulation)")
    std: NonNegative = Field(description="standard deviation of the draw")


class SigmaInits(Section):
    attention: SigmaInit
    output: SigmaInit


class Fidelity(Section):
    """``configs/fidelity/*.yaml``: the paper's text or the authors' code (docs/fidelity.md)."""

    name: Text = Field(description="choose it with fidelity=paper|authors")
    attention_scope: list[AttentionRole] = Field(description="fairseq: attention kinds σ acts in")
    incremental: Literal["same", "softmax"] = Field(description="fairseq: beam-search attention")
    sigma_weight_decay: bool = Field(description="fairseq: weight decay on the σ scalars")
    qkv_bias: bool = Field(description="DeiT: bias of the qkv projection")
    sigma_init: SigmaInits


class App(Section):
    """Keys of ``configs/suite.yaml``, shared by every app."""

    seed: Count
    dry_run: bool
    verbose: bool
    task: Text
    normalizer: Normalizer
    logger: Logger
    profile: Profile
    fidelity: Fidelity = None
    registry: dict[str, Any] | None = None  # the experiment's registry block (core.registry)

    @model_validator(mode="after")
    def _normalizers_fit_their_layers(self) -> App:
        """A causal-only normaliser needs causal attention (the LM); an output normaliser set
        apart must give a distribution (following the attention's, it falls back to softmax)."""
        model = getattr(self, "model", None)
        name, kind = self.normalizer.name, getattr(model, "kind", None)
        if NORMALIZERS[name].causal_only and kind in NON_CAUSAL_KINDS:
            raise cross(
                f"normalizer={name}: {name} attention is causal only and the {kind} models' "
                "attention is not (encoders see every token); use it with the language model"
            )
        output = getattr(model, "output_normalizer", None)
        if output in NORMALIZERS and output != name:
            try:
                check_output_normalizer(output)
            except ValueError as err:
                raise cross(str(err)) from None
        return self

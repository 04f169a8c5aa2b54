"""What each app's composed config may hold: one pydantic model per app (:data:`SCHEMAS`).

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

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from multimax import ATTENTION_PATHS, NORMALIZERS

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


def cross(message: str) -> PydanticCustomError:
    """A rule relating two keys, broken: ``message`` is the whole line."""
    return PydanticCustomError("cross", message)


def _timm_optimizer(name: str) -> str:
    from timm.optim import list_optimizers  # timm takes seconds to import: only vision asks

    known = list(list_optimizers())
    if name not in known:
        raise PydanticCustomError("choice", "{choices}", {"choices": known})
    return name


def _fairseq_betas(text: str) -> str:
    found = re.fullmatch(r"\(\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*\)", text.strip())
    try:
        if found and all(0 <= float(b) < 1 for b in found.groups()):
            return text
    except ValueError:
        pass
    raise PydanticCustomError("shape", 'a pair "(b1, b2)" with both in [0, 1)')


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
    tags: list[Text] = None


class Profile(Section):
    name: Literal["paper", "smoke"] = Field(description="choose it with profile=paper|smoke")


class App(Section):
    """Keys of ``configs/suite.yaml``, shared by every app."""

    seed: Count
    dry_run: bool
    verbose: bool
    task: Text
    normalizer: Normalizer
    logger: Logger
    profile: Profile
    registry: dict[str, Any] | None = None  # the experiment's registry block (core.registry)


# --- vision --------------------------------------------------------------------------------------


class VisionData(Section):
    kind: Literal["vision"]
    name: Text
    root: Text
    train_split: Text
    val_split: Text
    num_classes: Annotated[int, Field(ge=2)]
    train_size: PosInt
    val_size: PosInt
    img_size: PosInt
    in_chans: PosInt
    crop_pct: Annotated[float, Field(gt=0, le=1)]
    interpolation: Text
    mean: list[float]
    std: list[float]
    num_workers: Count
    bad_images: Literal["refuse", "skip"]
    pin_memory: bool
    prepare_command: Text


class VisionModel(Section):
    kind: Literal["vision"]
    name: Text
    output_normalizer: NormalizerName
    attention_impl: AttentionPath
    drop_path: Below1
    drop: Below1


class Augment(Section):
    auto_augment: Text | None
    color_jitter: NonNegative
    hflip: Share
    scale: list[float]
    ratio: list[float]
    reprob: Share
    remode: Literal["pixel", "rand", "const"]
    recount: PosInt
    mixup: NonNegative
    cutmix: NonNegative
    mixup_prob: Share
    mixup_switch_prob: Share
    mixup_mode: Literal["batch", "pair", "elem"]
    repeated_aug: bool
    repeats: PosInt
    no_aug: bool = None


class Optim(Section):
    opt: Annotated[Text, AfterValidator(_timm_optimizer)] = Field(description="timm's names")
    lr_base: Positive = Field(description="scaled by trainer.batch_size / optim.lr_base_batch")
    lr_base_batch: PosInt
    weight_decay: NonNegative
    eps: Positive
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)]
    clip_grad: Positive | None
    sched: Literal["cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd"]
    warmup_epochs: Count
    warmup_lr: NonNegative
    min_lr: NonNegative


class Trainer(Section):
    epochs: PosInt = Field(description="training epochs")
    batch_size: PosInt = Field(description="the global batch")
    eval_batch_size: PosInt
    label_smoothing: Below1
    amp: Literal["auto", "bfloat16", "float16", "none"]
    compile: bool
    ema: bool
    ema_decay: Annotated[float, Field(gt=0, lt=1)]
    eval_every_epochs: PosInt
    checkpoint_every_steps: PosInt
    log_every_steps: PosInt
    stop_after_steps: PosInt | None
    inject_nan_at_step: PosInt | None
    device: Literal["auto", "cpu", "cuda"]
    threads: PosInt | None
    dry_run_world_size: PosInt
    dry_run_cpu_batch: PosInt
    procs_per_node: PosInt | Literal["auto"]


class Vision(App):
    data: VisionData
    model: VisionModel
    augment: Augment
    optim: Optim
    trainer: Trainer


# --- language model and translation (fairseq) ----------------------------------------------------


class Generate(Section):
    kind: Text
    seed: int
    n_train: PosInt
    n_valid: PosInt
    n_test: PosInt


class Corpus(Section):
    hf_path: Text | None
    hf_name: Text | None
    hf_revision: Text | None
    local_path: Text | None
    files: dict[str, Text]
    splits: dict[str, Text | None]
    text_column: Text = None
    valid_every_nth_train: PosInt | None = None
    generate: Generate | None


class FairseqData(Section):
    name: Text
    root: Text
    dir: Text
    prepare_command: Text
    workers: PosInt
    corpus: Corpus
    dry_run_vocab: PosInt | dict[str, PosInt] | None


class Clean(Section):
    stage: Literal["before_split", "after_bpe"]
    min_len: PosInt
    max_len: PosInt
    ratio: Positive


class Recipe(Section):
    normalize_punctuation: bool
    remove_non_printing_char: bool
    aggressive_dash: bool
    lowercase: bool
    clean: Clean
    bpe_symbols: PosInt
    joined_dictionary: bool
    keep_text: bool


class LMData(FairseqData):
    kind: Literal["language_model"]


class MTData(FairseqData):
    kind: Literal["translation"]
    source_lang: Text
    target_lang: Text
    recipe: Recipe
    compound_split_bleu: bool = None


class FairseqModel(Section):
    name: Text
    arch: Text = judged_by_fairseq("fairseq's --arch")
    output_normalizer: NormalizerName
    attention_impl: AttentionPath
    args: Passthrough


class LMModel(FairseqModel):
    kind: Literal["language_model"]


class MTModel(FairseqModel):
    kind: Literal["translation"]


class Train(Passthrough):
    """``fairseq-train``'s options (``max_tokens`` -> ``--max-tokens``)."""

    lr: Positive = Field(None, description="fairseq's --lr, the peak learning rate")
    max_update: PosInt = Field(None, description="updates to train")
    warmup_updates: Count = None
    warmup_init_lr: NonNegative = None
    weight_decay: NonNegative = None
    clip_norm: NonNegative = Field(None, description="0 switches clipping off")
    max_tokens: PosInt = Field(None, description="tokens per micro-batch and GPU")
    update_freq: PosInt = None
    tokens_per_sample: PosInt = None
    label_smoothing: Below1 = None
    precision: Literal["fp32", "fp16", "amp", "bf16"] = None
    adam_betas: Annotated[Text, AfterValidator(_fairseq_betas)] = None
    save_interval_updates: Count = None
    keep_interval_updates: Annotated[int, Field(ge=-1)] = None
    log_interval: PosInt = None
    num_workers: Count = None
    output_sigma_grad_scale: Literal["inv_sqrt_vocab", "none"] | None = None
    eps_perplexity_epsilon: Epsilon = None


class EvaluateArgs(Passthrough):
    """``fairseq-eval-lm`` / ``fairseq-generate``'s options."""

    beam: PosInt = None
    batch_size: PosInt = None
    tokens_per_sample: PosInt = None
    context_window: Count = None
    lenpen: float = None

    @model_validator(mode="after")
    def _window_inside_block(self) -> EvaluateArgs:
        window, block = self.context_window, self.tokens_per_sample
        if window is not None and block is not None and window >= block:
            raise cross(
                f"evaluate.args.context_window={window}: must be smaller than "
                f"evaluate.args.tokens_per_sample={block} (fairseq-eval-lm scores each block "
                f"with that much context); e.g. evaluate.args.context_window={block // 2}"
            )
        return self


class Evaluate(Section):
    checkpoint: Text
    metric: Text
    eps_perplexity_epsilon: Epsilon = Field(description="the ε of the ε-perplexity")
    args: EvaluateArgs


class Distributed(Section):
    world_size: PosInt | Literal["auto"]
    port: Annotated[int, Field(ge=1, le=65535)]


class DryRunOptions(Section):
    world_size: PosInt
    cpu_max_tokens: Count


class Fairseq(App):
    train: Train
    evaluate: Evaluate
    distributed: Distributed
    dry_run_options: DryRunOptions


class LanguageModel(Fairseq):
    data: LMData
    model: LMModel


class Translation(Fairseq):
    data: MTData
    model: MTModel


# --- mechanism study -----------------------------------------------------------------------------


class RetrievalData(Section):
    name: Text
    num_items: PosInt
    num_relevant: PosInt
    num_classes: Annotated[int, Field(ge=2)]
    key_noise: NonNegative
    value_std: Positive
    eval_examples: PosInt

    @model_validator(mode="after")
    def _relevant_among_items(self) -> RetrievalData:
        if self.num_relevant > self.num_items:
            raise cross(
                f"data.num_relevant={self.num_relevant}: must be <= "
                f"data.num_items={self.num_items}"
            )
        return self


class RetrievalModel(Section):
    name: Text
    dim: PosInt
    heads: PosInt
    output_normalizer: Literal["none"] = Field(
        description="the regression head has no output normaliser"
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> RetrievalModel:
        if self.dim % self.heads:
            raise cross(f"model.heads={self.heads}: must divide model.dim={self.dim}")
        return self


class RetrievalTrain(Section):
    steps: PosInt
    batch_size: PosInt
    lr: Positive
    weight_decay: NonNegative
    log_every: PosInt


class RetrievalEval(Section):
    num_items: list[PosInt]
    rel_threshold: Annotated[float, Field(gt=0, le=1)]
    examples_to_save: Count
    score_examples: PosInt


class Study(Section):
    normalizers: list[Text]
    num_items: list[PosInt]
    num_relevant: list[PosInt]
    seeds: list[Count]


class Mechanism(App):
    threads: PosInt
    data: RetrievalData
    model: RetrievalModel
    train: RetrievalTrain
    eval: RetrievalEval
    study: Study


# --- benchmark -----------------------------------------------------------------------------------


class Shape(Section):
    batch: PosInt
    heads: PosInt
    tokens: PosInt = None
    head_dim: PosInt
    causal: bool
    repeats: PosInt = None
    rows: list[Text] = None


class AttentionBench(Section):
    dtype: Literal["float32", "bfloat16", "float16"]
    shapes: dict[str, Shape]
    rows: list[Text]
    inference_rows: list[Text]


class Scaling(Section):
    tokens: list[PosInt]
    shape: Shape
    rows: list[Text]
    inference_rows: list[Text]
    repeats: PosInt


class OutputCase(Section):
    tokens: PosInt
    vocab: PosInt


class OutputBench(Section):
    dim: PosInt
    dtype: Literal["float32", "bfloat16", "float16"]
    label_smoothing: Below1
    warmup: Count
    repeats: PosInt
    cases: dict[str, OutputCase]
    rows: list[Text]
    bytes_per_logit: dict[str, PosInt]
    memory_share: Annotated[float, Field(gt=0, le=1)]


class ModelBench(Section):
    enabled: bool
    batch: PosInt
    image_size: PosInt = None
    tokens: PosInt = None
    dim: PosInt = None
    heads: PosInt = None
    layers: PosInt = None
    vocab: PosInt = None


class ModelsBench(Section):
    repeats: PosInt
    deit_small: ModelBench
    lm: ModelBench


class Benchmark(App):
    out_dir: Text
    threads: PosInt | None
    compile_policy: Literal["auto", "always", "never"]
    warmup: Count
    repeats: PosInt
    sigma_std: NonNegative
    targets: dict[str, Positive]
    attention: AttentionBench
    scaling: Scaling
    output_layer: OutputBench
    models: ModelsBench


SCHEMAS: dict[str, type[App]] = {
    "vision": Vision,
    "language_model": LanguageModel,
    "translation": Translation,
    "mechanism": Mechanism,
    "benchmark": Benchmark,
}

"""The language-model and translation apps' configs (fairseq): our keys typed, fairseq's options
passed through (:class:`Passthrough`) for fairseq's parser."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from experiments.config.schemas.base import (
    App,
    AttentionPath,
    Below1,
    Count,
    Epsilon,
    NonNegative,
    NormalizerName,
    Passthrough,
    PosInt,
    Positive,
    Section,
    Text,
    cross,
    judged_by_fairseq,
)


def _fairseq_betas(text: str) -> str:
    found = re.fullmatch(r"\(\s*([0-9.eE+-]+)\s*,\s*([0-9.eE+-]+)\s*\)", text.strip())
    try:
        if found and all(0 <= float(b) < 1 for b in found.groups()):
            return text
    except ValueError:
        pass
    raise PydanticCustomError("shape", 'a pair "(b1, b2)" with both in [0, 1)')


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

"""The mechanism study's config (``configs/experiment/mechanism_retrieval.yaml``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from experiments.config.schemas.base import (
    App,
    Count,
    NonNegative,
    PosInt,
    Positive,
    Section,
    Text,
    cross,
)


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
                f"data.num_relevant={self.num_relevant}: must be <= data.num_items={self.num_items}"
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

"""The benchmark's config (``configs/benchmark.yaml``): speed and memory measurements."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from experiments.config.schemas.base import (
    App,
    Below1,
    Count,
    NonNegative,
    PosInt,
    Positive,
    Section,
    Text,
)


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

"""What each app's composed config may hold: one pydantic model per app (:data:`SCHEMAS`).

The sections (:mod:`.base`) refuse keys they do not name, check types strictly and refuse
NaN and infinities; ranges are ``Field`` bounds, choices ``Literal``s. Each app's sections
live in its own module.
"""

from __future__ import annotations

from experiments.config.schemas.base import JUDGED_BY_FAIRSEQ, App, Passthrough
from experiments.config.schemas.benchmark import Benchmark
from experiments.config.schemas.fairseq import LanguageModel, Translation
from experiments.config.schemas.mechanism import Mechanism
from experiments.config.schemas.vision import Vision

SCHEMAS: dict[str, type[App]] = {
    "vision": Vision,
    "language_model": LanguageModel,
    "translation": Translation,
    "mechanism": Mechanism,
    "benchmark": Benchmark,
}

__all__ = ["JUDGED_BY_FAIRSEQ", "SCHEMAS", "App", "Passthrough"]

"""The normaliser zoo behind one contract: ``forward(x, mask=None, dim=-1, bias=None)``.

Every normaliser is two steps, applied along ``dim``:

1. ``transform(x)``: a point-wise map of the scores (identity, ``x / T``, MultiMax's σ);
2. a *mapping* of the transformed scores onto the probability simplex
   (softmax, sparsemax, 1.5-entmax, evidential softmax).

``bias`` (an additive attention mask or position bias) is added between the two steps, so σ
sees the raw scores. ``mask`` is boolean, ``True`` = keep; masked entries get
exactly zero and a row with every entry masked returns zeros, never NaN. Half-precision
inputs are computed in float32 and returned in their own dtype.

The functional forms (``softmax_masked``, ``sparsemax_masked``, ...) hold the math; the
``nn.Module`` classes own parameters and the train/eval switch; ``NORMALIZERS`` and
``build_normalizer`` are the registry that configs select from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import entmax
import torch
from torch import Tensor, nn

from .precision import upcast
from .sigma import (
    IDENTITY_SIGMA,
    TEMPERATURE_SIGMA,
    divide_by_temperature,
    register_pointwise_sigma,
)

# A masked entry is moved this far below the row's largest kept score before the mapping.
# Any margin > 2 gives an exact zero under sparsemax (threshold >= max - 1) and 1.5-entmax
# (threshold >= max/2 - 1); exp(-1e4) underflows to exactly 0 in float32 for softmax.
_MASK_MARGIN = 1.0e4

# An additive mask entry at or below this value is a masked entry, not a score offset:
# fairseq fills masks with -1e8 (-1e4 in half precision), Hugging Face with finfo.min, and
# exp(-1e4) is exactly 0 in every float type, so softmax gives such entries no weight anyway;
# counting them as masked keeps them out of evsoftmax's row mean too.
MASKED_BIAS = -1.0e4

EVSOFTMAX_EPSILON = 1.0e-6


def _fill_masked(x: Tensor, keep: Tensor, dim: int) -> Tensor:
    """Replace masked entries by (largest kept entry - margin), finite even for empty rows."""
    row_max = x.masked_fill(~keep, float("-inf")).amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    return torch.where(keep, x, row_max - _MASK_MARGIN)


def _apply_mapping(
    mapping: Callable[[Tensor, int], Tensor], x: Tensor, mask: Tensor | None, dim: int
) -> Tensor:
    if x.shape[dim] == 0:  # no entry to normalise (zero keys): empty, still in the graph
        return x * 0
    if mask is None:
        return mapping(x, dim)
    keep = mask.to(torch.bool).expand_as(x)
    p = mapping(_fill_masked(x, keep, dim), dim)
    return torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))


# --- functional forms -------------------------------------------------------------------


def softmax_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """softmax(x)_i = exp(x_i) / Σ_j exp(x_j) over the kept entries; zeros elsewhere."""
    return _apply_mapping(lambda h, d: torch.softmax(h, dim=d), x, mask, dim)


def sparsemax_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """sparsemax(x) = argmin_{p in simplex} ||p - x||² (Martins & Astudillo, 2016)."""
    return _apply_mapping(lambda h, d: entmax.sparsemax(h, dim=d), x, mask, dim)


def entmax15_masked(x: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """1.5-entmax(x)_i = [x_i/2 - τ]_+² with τ such that Σ p = 1 (Peters et al., 2019)."""
    return _apply_mapping(lambda h, d: entmax.entmax15(h, dim=d), x, mask, dim)


def evsoftmax_log_weights(
    x: Tensor, mask: Tensor | None = None, dim: int = -1, epsilon: float = 0.0
) -> Tensor:
    """log w_i for evidential softmax: 0 where x_i >= mean of the kept x, log ε below it.

    With ε = 0 the entries below the mean are sent to the mask margin (exactly zero weight).
    """
    if mask is None:
        mean = x.mean(dim=dim, keepdim=True)
    else:
        keep = mask.to(torch.bool).expand_as(x)
        count = keep.sum(dim=dim, keepdim=True).clamp_min(1)
        mean = torch.where(keep, x, torch.zeros_like(x)).sum(dim=dim, keepdim=True) / count
    low = math.log(epsilon) if epsilon > 0 else -_MASK_MARGIN
    above = x.detach() >= mean.detach()
    return torch.where(above, torch.zeros_like(x), torch.full_like(x, low))


def evsoftmax_masked(
    x: Tensor, mask: Tensor | None = None, dim: int = -1, epsilon: float = 0.0
) -> Tensor:
    """Evidential softmax (Chen et al., 2021): p_i ∝ w_i exp(x_i), w_i = 1 if x_i >= mean(x)
    else ε (ε > 0 in training, ε = 0 at evaluation), renormalised over the kept entries."""
    return softmax_masked(x + evsoftmax_log_weights(x, mask, dim, epsilon), mask, dim)


# --- modules ----------------------------------------------------------------------------


class Normalizer(nn.Module):
    """Base class: ``forward(x, mask=None, dim=-1, bias=None)`` -> probabilities along dim.

    Subclasses set ``mapping`` (``"softmax"``, ``"sparsemax"``, ``"entmax15"``,
    ``"evsoftmax"``) and may override ``transform`` (a point-wise map of the scores).
    """

    mapping: str = "softmax"

    def transform(self, x: Tensor) -> Tensor:
        """Point-wise score map applied before masking; identity by default."""
        return x

    @property
    def is_plain_softmax(self) -> bool:
        """True when this normaliser is exactly softmax(x) (fast paths may use SDPA)."""
        return False

    def map_to_simplex(self, h: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
        """The mapping step alone, on already transformed scores."""
        if self.mapping == "softmax":
            return softmax_masked(h, mask, dim)
        if self.mapping == "sparsemax":
            return sparsemax_masked(h, mask, dim)
        if self.mapping == "entmax15":
            return entmax15_masked(h, mask, dim)
        if self.mapping == "evsoftmax":
            epsilon = EVSOFTMAX_EPSILON if self.training else 0.0
            return evsoftmax_masked(h, mask, dim, epsilon)
        raise ValueError(f"unknown mapping {self.mapping!r}")

    def forward(
        self, x: Tensor, mask: Tensor | None = None, dim: int = -1, bias: Tensor | None = None
    ) -> Tensor:
        h = self.transform(upcast(x))
        if bias is not None:
            h = h + upcast(bias)
        return self.map_to_simplex(h, mask, dim).to(x.dtype)


class Softmax(Normalizer):
    """softmax(x / T): T fixed (``temperature``) or learned (``learn_temperature=True``).

    A learned temperature is stored as log T so it stays positive.
    """

    def __init__(self, temperature: float = 1.0, learn_temperature: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        self.learn_temperature = learn_temperature
        log_t = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)
        self._fixed_temperature = float(temperature)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    @property
    def is_plain_softmax(self) -> bool:
        return not self.learn_temperature and self._fixed_temperature == 1.0

    def transform(self, x: Tensor) -> Tensor:
        if self.is_plain_softmax:
            return x
        return divide_by_temperature(x, self.log_temperature)

    def extra_repr(self) -> str:
        return f"temperature={self._fixed_temperature}, learn_temperature={self.learn_temperature}"


register_pointwise_sigma(
    Softmax, lambda n: IDENTITY_SIGMA if n.is_plain_softmax else TEMPERATURE_SIGMA
)


class Sparsemax(Normalizer):
    """sparsemax(x): Euclidean projection onto the simplex (exact zeros)."""

    mapping = "sparsemax"


class Entmax15(Normalizer):
    """1.5-entmax(x): between softmax and sparsemax (exact zeros, smoother)."""

    mapping = "entmax15"


class EvSoftmax(Normalizer):
    """Evidential softmax: entries below the row mean get weight ε in training, 0 in eval."""

    mapping = "evsoftmax"


# --- registry ---------------------------------------------------------------------------


class NormalizerRegistry(Mapping[str, type[Normalizer]]):
    """Name -> normaliser class. ``print(NORMALIZERS)`` lists the names."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Normalizer]] = {}

    def register(self, name: str) -> Callable[[type[Normalizer]], type[Normalizer]]:
        def decorator(cls: type[Normalizer]) -> type[Normalizer]:
            if name in self._classes:
                raise ValueError(f"normalizer {name!r} is already registered")
            self._classes[name] = cls
            cls.registry_name = name
            return cls

        return decorator

    def __getitem__(self, name: str) -> type[Normalizer]:
        if name not in self._classes:
            raise KeyError(f"unknown normalizer {name!r}; valid names: {', '.join(self._classes)}")
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"NORMALIZERS({', '.join(self._classes)})"


NORMALIZERS = NormalizerRegistry()
NORMALIZERS.register("softmax")(Softmax)
NORMALIZERS.register("sparsemax")(Sparsemax)
NORMALIZERS.register("entmax15")(Entmax15)
NORMALIZERS.register("evsoftmax")(EvSoftmax)


def build_normalizer(name: str | None = "softmax", **options) -> Normalizer:
    """Build a normaliser by registry name; ``None`` means plain softmax.

    ``options`` are the class's own keyword arguments (``order`` for multimax, ``temperature``
    and ``learn_temperature`` for softmax). Unknown names and options raise ``ValueError``
    naming what is valid.
    """
    name = "softmax" if name is None else name
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; valid names: {', '.join(NORMALIZERS)}")
    cls = NORMALIZERS[name]
    try:
        return cls(**options)
    except TypeError as err:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(
            f"normalizer {name!r} got options {sorted(options)}; it accepts "
            f"{accepted or 'no options'} ({err})"
        ) from err


__all__ = [
    "EVSOFTMAX_EPSILON",
    "MASKED_BIAS",
    "NORMALIZERS",
    "Entmax15",
    "EvSoftmax",
    "Normalizer",
    "NormalizerRegistry",
    "Softmax",
    "Sparsemax",
    "build_normalizer",
    "entmax15_masked",
    "evsoftmax_log_weights",
    "evsoftmax_masked",
    "softmax_masked",
    "sparsemax_masked",
]

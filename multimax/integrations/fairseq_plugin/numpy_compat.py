"""fairseq 0.12 under NumPy 2: the one removed NumPy name it still reads, restored.

fairseq-fixed 0.12.3.1 asks for ``np.compat.long`` as a dtype in ``TokenBlockDataset`` with
``--sample-break-mode eos`` (``fairseq-eval-lm``, the language model hub's ``sample`` /
``score``; also ``LanguagePairDataset`` with ``--num-batch-buckets``, which fails earlier under
NumPy 2, on ``np.percentile``'s removed ``interpolation=``). NumPy 2 removed
``numpy.compat``; in NumPy 1 ``np.compat.long`` was Python's ``int`` (NumPy's default
integer). Importing the plugin provides exactly that name, and only when NumPy lacks
``numpy.compat``; nothing of fairseq is changed.
"""

from __future__ import annotations

import types

import numpy as np


def provide_numpy_compat_long() -> None:
    """Give NumPy a ``compat`` namespace holding ``long = int`` if it has none (NumPy ≥ 2).
    Idempotent; a NumPy that still has ``numpy.compat`` is left as it is."""
    try:
        np.compat  # noqa: B018 - NumPy 2's module __getattr__ raises for the removed name
    except AttributeError:
        shim = types.ModuleType("numpy.compat", "fairseq 0.12's np.compat.long, for NumPy 2")
        shim.long = int
        np.compat = shim


__all__ = ["provide_numpy_compat_long"]

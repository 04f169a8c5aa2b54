"""pytest plugin of the GPU check: keep only the tests that need CUDA.

    python -m pytest -p scripts.gpu_check_pytest tests

A test needs CUDA when it carries the ``cuda`` marker (pyproject.toml) or a ``skipif`` whose
reason names CUDA (``needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")``);
every other test is deselected. Tests that skip themselves from inside their body are not seen.
"""

from __future__ import annotations

import pytest


def needs_cuda(item: pytest.Item) -> bool:
    if item.get_closest_marker("cuda") is not None:
        return True
    return any(
        "cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep = [item for item in items if needs_cuda(item)]
    dropped = [item for item in items if not needs_cuda(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep

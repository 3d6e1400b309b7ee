"""Shared fixtures of the test suite. Nothing here changes global state for other test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "models(*names): needs these model libraries (default: timm, torchvision, "
        "transformers); skipped where missing, failed where NORMKIT_REQUIRE_MODELS=1 "
        "(tests/models_util.py)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``@pytest.mark.models(...)`` skips (or, in CI, fails) before it runs when a
    named model library is missing."""
    marks = list(item.iter_markers("models"))
    if marks:
        from models_util import require_models

        for mark in marks:
            require_models(*mark.args)


@pytest.fixture
def dynamo_reset() -> Iterator[None]:
    """Fresh ``torch._dynamo`` caches before and after a ``torch.compile`` test, so guards and
    recompilation limits of one case never leak into another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

"""Shared fixtures of the test suite. Nothing here changes global state for other test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def dynamo_reset() -> Iterator[None]:
    """Fresh ``torch._dynamo`` caches before and after a ``torch.compile`` test, so guards and
    recompilation limits of one case never leak into another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()

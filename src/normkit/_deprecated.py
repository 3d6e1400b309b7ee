"""Deprecated names that moved up a layer, installed where they used to be.

A deprecation alias that imported its new home from the old module would be an import running
back up the layers (and a cycle); the package installs the aliases on the lower modules instead,
after everything is imported (``import normkit`` always runs first: it is every module's parent).

- ``normkit.functional.normalize`` → :func:`normkit.normalize` (the functional form drives a
  partition and an operation, so it lives with the pipeline, :mod:`normkit._pipeline`).
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Any

from torch import Tensor

from . import _pipeline, functional

__all__: list[str] = []


@functools.wraps(_pipeline.normalize)
def _functional_normalize(x: Tensor, **kw: Any) -> Tensor:
    warnings.warn("normkit.functional.normalize is deprecated; use normkit.normalize",
                  DeprecationWarning, stacklevel=2)
    return _pipeline.normalize(x, **kw)


_functional_normalize.__doc__ = ("Deprecated alias of :func:`normkit.normalize` (warns).\n\n"
                                 + (_pipeline.normalize.__doc__ or ""))
functional.normalize = _functional_normalize  # type: ignore[attr-defined]
sys.modules["normkit.functional.normalize"].normalize = _functional_normalize  # type: ignore[attr-defined]

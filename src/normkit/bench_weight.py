"""Deprecated: the weight benchmark moved to ``normkit._bench.weights`` (``normkit bench --weights``).

Importing this alias warns once (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings

from ._bench.weights import LAYER_METHODS, ORTHO_SHAPES, run_weights, weights_report

__all__ = ["run_weights", "weights_report", "LAYER_METHODS", "ORTHO_SHAPES"]

warnings.warn("normkit.bench_weight is deprecated: the weight benchmark moved to "
              "normkit._bench.weights; run it with `normkit bench --weights`", DeprecationWarning,
              stacklevel=2)

"""Deprecated: the benchmarks moved to ``normkit._bench`` (run them with ``normkit bench``).

This alias keeps ``normkit.benchmarking.main`` and the other names of its old ``__all__`` working;
importing it warns once (``DeprecationWarning``).
"""

from __future__ import annotations

import warnings

from ._bench import (
                     MODES,
                     ShapeSpec,
                     build_parser,
                     copy_bandwidth,
                     machine_info,
                     main,
                     parse_shape,
                     report,
                     run,
                     run_whitening,
                     whitening_report,
)

__all__ = ["MODES", "ShapeSpec", "build_parser", "copy_bandwidth", "machine_info", "main",
           "parse_shape", "report", "run", "run_whitening", "whitening_report"]

warnings.warn("normkit.benchmarking is deprecated: the benchmarks moved to normkit._bench; run "
              "them with `normkit bench`", DeprecationWarning, stacklevel=2)

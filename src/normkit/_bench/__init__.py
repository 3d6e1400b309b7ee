"""The benchmarks behind ``normkit bench`` (``python benchmarks/run.py``): not part of the library's API.

* :mod:`~normkit._bench.timing` — round-robin timing, saved-for-backward bytes, machine facts, tables;
* :mod:`~normkit._bench.reference` — plain formulas and torch's modules per method, and the float64
  whitening formula the tests share;
* :mod:`~normkit._bench.speed` — every preset against torch's kernel and the plain formula;
* :mod:`~normkit._bench.whitening` — ``--whitening``; :mod:`~normkit._bench.weights` — ``--weights``;
* :mod:`~normkit._bench.cli` — ``main(argv)``, what both commands call.
"""

from __future__ import annotations

from .cli import build_parser, main
from .speed import MODES, report, run
from .timing import ShapeSpec, copy_bandwidth, machine_info, parse_shape
from .weights import run_weights, weights_report
from .whitening import run_whitening, whitening_report

__all__ = ["MODES", "ShapeSpec", "build_parser", "copy_bandwidth", "machine_info", "main",
           "parse_shape", "report", "run", "run_weights", "run_whitening", "weights_report",
           "whitening_report"]

"""The benchmarks behind ``normkit bench`` (``python benchmarks/run.py``): not part of the library's API.

* :mod:`~normkit._bench.timing` — round-robin timing, saved-for-backward bytes, machine facts, tables;
* :mod:`~normkit._bench.reference` — plain formulas and torch's modules per method, and the float64
  whitening formula the tests share;
* :mod:`~normkit._bench.speed` — every preset against torch's kernel and the plain formula;
* :mod:`~normkit._bench.whitening` — ``--whitening``; :mod:`~normkit._bench.weights` — ``--weights``;
* :mod:`~normkit._bench.goalrun` — ``--goals``: every method against the speed goals of issue 20,
  which :mod:`~normkit._bench.goals` holds as one table; :mod:`~normkit._bench.conditioned` builds
  every method (conditional ones with a fixed condition) as ``m(x)``;
* :mod:`~normkit._bench.cli` — ``main(argv)``, what both commands call.
"""

from __future__ import annotations

from .cli import build_parser, main
from .goalrun import GOAL_SHAPES, goals_report, run_goals
from .goals import GOALS, PEERS, goals_for
from .speed import MODES, report, run
from .timing import ShapeSpec, copy_bandwidth, machine_info, parse_shape
from .weights import run_weights, weights_report
from .whitening import run_whitening, whitening_report

__all__ = ["GOALS", "GOAL_SHAPES", "MODES", "PEERS", "ShapeSpec", "build_parser", "copy_bandwidth",
           "goals_for", "goals_report", "machine_info", "main", "parse_shape", "report", "run",
           "run_goals", "run_weights", "run_whitening", "weights_report", "whitening_report"]

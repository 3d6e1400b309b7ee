r"""Statistics of a comparison: intervals over seeds, paired tests and the recommendation.

Runs of one (method, batch size) differ only in their seed, and runs of different methods with
the same seed share the initialization of every weight outside the normalization and the order of
the data, so differences between methods are tested **paired over seeds**:

* interval: the mean over ``n`` seeds with the Student-t 95 % interval
  :math:`\bar e \pm t_{0.975,\,n-1}\, s/\sqrt n` (no interval for one seed);
* tie with the best: for each method ``M`` and the method ``B`` of lowest mean error, the
  one-sided paired t-test of :math:`H_1: e_M > e_B` over the seeds both finished
  (``scipy.stats.ttest_rel``); ``M`` is *not significantly worse* when :math:`p \ge \alpha`
  (0.05). With fewer than two common seeds nothing can be tested and only ``B`` is named.

Example::

    >>> from normkit.experiments.stats import interval, recommend
    >>> mean, lo, hi = interval([1.0, 2.0, 3.0])
    >>> mean, round(hi - mean, 3)
    (2.0, 2.484)
    >>> recs = [{"method": m, "batch_size": 8, "seed": s, "status": "ok", "test_error": e}
    ...         for m, errs in {"bn": [3, 4, 3.5], "gn": [3.4, 3.8, 3.6], "none": [20, 24, 22]}.items()
    ...         for s, e in enumerate(errs)]
    >>> r = recommend(recs)[0]
    >>> r.best, r.tied
    ('bn', ['gn'])
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ALPHA", "Evidence", "Recommendation", "interval", "paired_p", "recommend",
           "recommendation_lines"]

ALPHA = 0.05
Record = dict[str, Any]


def interval(values: list[float], confidence: float = 0.95) -> tuple[float, float | None,
                                                                      float | None]:
    """Mean of ``values`` and its Student-t ``confidence`` interval ``(mean, low, high)``;
    ``low``/``high`` are ``None`` for a single value."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1)) * statistics.stdev(
        values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def paired_p(worse: list[float], best: list[float]) -> float | None:
    """One-sided paired t-test p-value of ``mean(worse - best) > 0`` (``None`` with < 2 pairs).

    Equal pairs (no difference on any seed) give p = 1; a constant positive difference p = 0.
    """
    from scipy import stats

    if len(worse) < 2:
        return None
    diffs = [w - b for w, b in zip(worse, best, strict=True)]
    if statistics.pstdev(diffs) == 0:
        return 0.0 if diffs[0] > 0 else 1.0
    return float(stats.ttest_rel(worse, best, alternative="greater").pvalue)


@dataclass
class Evidence:
    """One method at one batch size: mean test error, its interval, and the paired comparison
    with the best method (``diff`` in points, ``p``; ``None`` for the best itself)."""

    method: str
    mean: float
    low: float | None
    high: float | None
    seeds: int
    diff: float | None = None
    p: float | None = None


@dataclass
class Recommendation:
    """At one batch size: the best method, the methods not significantly worse, the evidence."""

    batch_size: int
    best: str
    tied: list[str]
    seeds: int
    evidence: list[Evidence] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def text(self) -> str:
        """One line: ``at batch size B on this task: M (and the tied ones)``."""
        tied = f" (and {', '.join(self.tied)}: not significantly worse)" if self.tied else ""
        return f"at batch size {self.batch_size} on this task: {self.best}{tied}"


def _headline(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.get("phase", "test") == "test"]


def recommend(records: Iterable[Record], alpha: float = ALPHA) -> list[Recommendation]:
    """Per batch size, the method of lowest mean test error and those tied with it.

    Only test-phase records count (a tuned sweep's validation runs choose the learning rate,
    :mod:`normkit.experiments.tuning`). A method with a seed that did not finish is left out of
    the ranking and listed in ``missing``. Returns one :class:`Recommendation` per batch size.
    """
    by: dict[int, dict[str, dict[int, float | None]]] = {}
    for r in _headline(records):
        by.setdefault(r["batch_size"], {}).setdefault(r["method"], {})[r["seed"]] = (
            r["test_error"] if r.get("status") == "ok" else None)
    out = []
    for bs in sorted(by):
        complete = {m: s for m, s in by[bs].items() if s and all(v is not None for v in
                                                                  s.values())}
        missing = [m for m in by[bs] if m not in complete]
        if not complete:
            continue
        means = {m: statistics.fmean(s.values()) for m, s in complete.items()}  # type: ignore[arg-type]
        best = min(means, key=lambda m: (means[m], m))
        evidence, tied = [], []
        for m in sorted(complete, key=lambda m: means[m]):
            mean, lo, hi = interval(list(complete[m].values()))  # type: ignore[arg-type]
            ev = Evidence(m, mean, lo, hi, len(complete[m]))
            if m != best:
                seeds = sorted(set(complete[m]) & set(complete[best]))
                ev.diff = mean - means[best]
                ev.p = paired_p([complete[m][s] for s in seeds],  # type: ignore[misc]
                                [complete[best][s] for s in seeds])  # type: ignore[misc]
                if ev.p is not None and ev.p >= alpha:
                    tied.append(m)
            evidence.append(ev)
        out.append(Recommendation(bs, best, tied, len(complete[best]), evidence, missing))
    return out


def _fmt(ev: Evidence) -> str:
    ci = (f" [{max(ev.low, 0.0):.1f}, {min(ev.high, 100.0):.1f}]"  # type: ignore[type-var]
          if ev.low is not None else "")
    if ev.diff is None:
        return f"{ev.method} {ev.mean:.1f} %{ci}"
    p = "no test" if ev.p is None else ("p < 0.001" if ev.p < 0.001 else f"p = {ev.p:.3f}")
    return f"{ev.method} {ev.mean:.1f} %{ci} ({ev.diff:+.1f}, {p})"


def recommendation_lines(recs: list[Recommendation], alpha: float = ALPHA) -> list[str]:
    """Markdown-ready lines: the recommendation per batch size with its evidence (test error,
    95 % interval, difference to the best and one-sided paired p-value)."""
    lines = []
    for r in recs:
        lines.append(f"**{r.text()}** — " + "; ".join(_fmt(ev) for ev in r.evidence)
                     + (f"; not ranked (a seed did not finish): {', '.join(r.missing)}"
                        if r.missing else ""))
    if recs:
        n = max(r.seeds for r in recs)
        lines.append(f"Test error % and its 95 % t interval over {n} seeds; in parentheses the "
                     "difference to the best (points) and the p-value of a one-sided paired "
                     f"t-test over seeds; tied with the best when p ≥ {alpha}." if n > 1 else
                     "Test error % of one seed: nothing can be tested; run more --seeds.")
    return lines

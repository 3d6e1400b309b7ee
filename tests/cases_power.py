"""Generic-table rows of PowerNorm (issue 7); appended to ``cases.CASES``."""

from __future__ import annotations

CASES: list = []

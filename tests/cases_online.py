"""Generic-table rows of the online family (issue 7); appended to cases.CASES."""

from __future__ import annotations

CASES: list = []

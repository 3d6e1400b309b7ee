"""Generic-table rows of the robust family (issue 7); appended to cases.CASES."""

from __future__ import annotations

CASES: list = []

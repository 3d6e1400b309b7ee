"""Generic-table rows of the multimode family (issue 7); appended to cases.CASES."""

from __future__ import annotations

CASES: list = []

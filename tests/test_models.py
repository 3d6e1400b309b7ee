"""The model-integration table (``tests/models_table.py``): every model family × what normkit
does to it — ``norm_layer=``, convert to the same kind (exact) and to gn / iternorm / dbn (trains),
fold (exact or a clear refusal), compile (equal to eager), state_dict round trip. The sync column
is ``tests/test_models_sync.py``. Each cell either meets its figures or raises; a cell that fails
on another branch's open bug is a strict xfail naming it.

Runtime: about 80 s on one core (tiny models, 32×32 inputs, batch 4, 4 steps).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import models_table as mt
from models_util import import_or_fail

# (family, column) -> reason, for a cell that fails on another branch's open bug: a strict
# xfail naming it. Empty since wip/surgery (norm+act layers, recognition of timm/HF norms) and
# wip/whiten (in-place ops after whitening, fullgraph compile) are merged.
XFAIL: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_base_models() -> Iterator[None]:
    yield
    mt._base_state.cache_clear()  # ~150 MB of models: not for the rest of the session


def _params() -> list:
    out = []
    for fam, col in mt.cells():
        reason = XFAIL.get((fam, col))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(fam, col, id=f"{fam}-{col}", marks=marks))
    return out


def test_xfail_entries_are_cells() -> None:
    assert set(XFAIL) <= set(mt.cells()), set(XFAIL) - set(mt.cells())


@pytest.mark.parametrize(("family", "column"), _params())
def test_cell(family: str, column: str) -> None:
    import_or_fail(mt.FAMILIES[family].requires)
    mt.run_cell(family, column)

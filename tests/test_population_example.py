"""``examples/population_whitening.py --quick``: runs, prints both tables, and its two models
start from the same function (same initialization; the first refresh preserves it)."""

from __future__ import annotations

import math

import pytest

from examples_util import load_example


@pytest.fixture(scope="module")
def example():  # type: ignore[no-untyped-def]
    return load_example("population_whitening")


@pytest.fixture(scope="module")
def dataset(example):  # type: ignore[no-untyped-def]
    from normkit.experiments.data import load_dataset

    return load_dataset("mnist1d", subset=example.parse(["--quick"]).subset)  # generated: ~4 s


def test_quick_run_prints_tables(example, dataset, capsys) -> None:  # type: ignore[no-untyped-def]
    out = example.main(["--quick"], dataset=dataset)
    text = capsys.readouterr().out
    assert "Table 1: the same lr = 0.05 for both" in text and "Table 2: each at its best lr" in text
    assert text.count("| 0 |") == 2  # one seed per table
    for table in (out["common"], out["best"]):
        (row,) = table
        assert math.isfinite(row["target"]) and math.isfinite(row["final_whitened"])
        assert row["steps_plain"] is not None and row["steps_plain"] <= 60
    assert set(out["best_lr"].values()) <= {0.05, 0.2}


def test_same_start_and_steps_to(example, dataset) -> None:  # type: ignore[no-untyped-def]
    args = example.parse(["--quick", "--steps", "10"])
    plain, white = example.train(dataset, 0, False, args), example.train(dataset, 0, True, args)
    assert plain["curve"][0][0] == white["curve"][0][0] == 0
    assert math.isclose(plain["curve"][0][1], white["curve"][0][1], rel_tol=1e-5)
    assert example.steps_to([(0, 2.0), (10, 1.0), (20, 0.5)], 1.0) == 10
    assert example.steps_to([(0, 2.0)], 1.0) is None

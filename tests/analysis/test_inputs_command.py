"""``normkit analyze inputs``: the chapter-2 table and plot through the command line."""

from __future__ import annotations

import json

from normkit.cli import main


def test_analyze_inputs_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    rc = main(["analyze", "inputs", "--subset", "400", "--out", str(tmp_path), "--plain"])
    assert rc == 0
    out = capsys.readouterr().out
    for label in ("raw", "centred", "standardized", "whitened", "condition number", "GD steps"):
        assert label in out
    payload = json.loads((tmp_path / "inputs.json").read_text())
    rows = payload["results"]
    assert [r["preprocessing"] for r in rows] == ["raw", "centred", "standardized", "whitened"]
    steps = [r["steps"] for r in rows]
    assert steps == sorted(steps, reverse=True) and steps[-1] == 1
    assert rows[-1]["cond"] < 1 + 1e-3 < rows[0]["cond"]
    assert (tmp_path / "inputs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_inputs_logistic_with_a_small_budget(tmp_path, capsys):
    rc = main(["analyze", "inputs", "--subset", "200", "--loss", "logistic", "--max-steps", "20",
               "--target-loss", "0.01", "--out", str(tmp_path), "--plain"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "> 20" in out  # the target is not reached in 20 steps: reported, not hidden
    assert (tmp_path / "inputs.png").exists()


def test_analyze_inputs_bad_input_exits_2(tmp_path):
    assert main(["analyze", "inputs", "--dataset", "nope", "--out", str(tmp_path)]) == 2
    assert main(["analyze", "inputs", "--rel-tol", "-1", "--out", str(tmp_path)]) == 2
    assert main(["analyze", "inputs", "--loss", "hinge"]) == 2

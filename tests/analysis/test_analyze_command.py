"""``normkit analyze`` dispatches to the analysis tools' own parser."""

from __future__ import annotations

import json

from normkit.cli import main


def test_analyze_snd_through_the_normkit_command(tmp_path):
    rc = main(["analyze", "snd", "--methods", "bn,dbn", "--dim", "4", "--batch-sizes", "8,16",
               "--samples", "3", "--batches", "3", "--data-size", "64", "--out", str(tmp_path),
               "--plain"])
    assert rc == 0
    rows = json.loads((tmp_path / "snd.json").read_text())["results"]
    assert {r["method"] for r in rows} == {"bn", "dbn"} and (tmp_path / "snd.png").exists()


def test_analyze_bad_input_exits_2(tmp_path):
    assert main(["analyze", "snd", "--methods", "no_such_method", "--out", str(tmp_path)]) == 2
    assert main(["analyze", "nothing"]) == 2

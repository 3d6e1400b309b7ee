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


def test_analyze_conditioning_reads_a_compare_run(tmp_path, capsys):
    def record(method, kappas):
        history = [{"epoch": i + 1, "analysis": {"x_kappa_0.5": k, "x_lambda_max": 1.0}}
                   for i, k in enumerate(kappas)]
        return {"method": method, "batch_size": 8, "seed": 0, "status": "ok", "history": history}

    lines = [record("bn", [10.0, 20.0]), record("none", [100.0, 300.0])]
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert main(["analyze", "conditioning", "--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bn" in out and "20" in out and "300" in out
    assert (tmp_path / "conditioning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_conditioning_without_records_exits_2(tmp_path):
    assert main(["analyze", "conditioning", "--run", str(tmp_path)]) == 2  # no results.jsonl
    (tmp_path / "results.jsonl").write_text(json.dumps(
        {"method": "bn", "batch_size": 8, "status": "ok", "history": [{"epoch": 1}]}))
    assert main(["analyze", "conditioning", "--run", str(tmp_path)]) == 2  # run without --analyze


def test_snd_iterations_only_for_methods_that_iterate():
    """``--iterations`` goes to IterNorm and ``method=newton`` whitening, not to ZCA ones (whose
    presets refuse an ``iterations=`` they would ignore)."""
    from normkit.analysis.cli import _method_kwargs

    assert _method_kwargs("group_whitening", 4, 7) == ("group_whitening", {})
    assert _method_kwargs("group_whitening:method=newton", 4, 7) == (
        "group_whitening", {"iterations": 7, "method": "newton"})
    assert _method_kwargs("iternorm", 4, 7) == ("iternorm", {"group_size": 4, "iterations": 7})

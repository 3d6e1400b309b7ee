"""Smoke test of the benchmark harness: tiny shapes, one round, the JSON structure (never timings)."""

from __future__ import annotations

import json

import pytest
import torch

from normkit import _bench as B
from normkit._bench import reference, speed, whitening


def test_parse_shape() -> None:
    assert B.parse_shape("4x8x3x3") == B.ShapeSpec((4, 8, 3, 3), "nchw")
    assert B.parse_shape("4x8x3x3:cl").layout == "channels_last"
    assert B.parse_shape("16x32").layout == "rows"
    for bad in ("4x8x3", "16x32:cl", "ax8", "4x0x3x3"):
        with pytest.raises(ValueError, match="bad"):
            B.parse_shape(bad)


def test_main_writes_json(tmp_path, capsys) -> None:
    path = tmp_path / "out.json"
    threads = torch.get_num_threads()
    rc = B.main(["--shapes", "4x32x4x4,4x32x4x4:cl", "16x32", "--methods", "bn,gn,rms_norm,lrn,l1_bn",
                 "--repeats", "1", "--warmup", "1", "--no-compile", "--plain", "--threads", "1",
                 "--json", str(path)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored
    out = capsys.readouterr().out
    assert "targets" in out and "rms_norm" in out
    r = json.loads(path.read_text())
    assert r["schema"] == 1
    assert {"cpu", "torch", "threads", "cpu_count"} <= set(r["machine"])
    assert r["config"]["shapes"] == ["4x32x4x4", "4x32x4x4:cl", "16x32"]
    assert r["copy_bandwidth_gbs"] > 0
    assert not r["errors"], r["errors"]
    cells = {(c["method"], c["shape"], c["mode"]): c for c in r["cells"]}
    assert set(B.MODES) == {m for (_, _, m) in cells}
    # native methods are judged against torch, the others against torch BN at the same shape
    bn = cells[("bn", "4x32x4x4", "fb-train")]
    assert bn["native"] and bn["ref"] == "torch"
    assert {"ours", "torch", "plain", "generic"} <= set(bn["medians_ms"])
    assert "target_met" in bn and bn["target"] == speed.NATIVE_TARGET
    l1 = cells[("l1_bn", "16x32", "fb-train")]
    assert not l1["native"] and l1["ref"] == "bn_torch"
    assert {"ours", "plain", "bn_torch"} <= set(l1["medians_ms"])
    assert ("lrn", "16x32", "fb-train") not in cells  # spatial-only methods skip row shapes
    for row in r["results"]:
        assert {"method", "shape", "layout", "mode", "impl", "median_ms", "times_ms", "gbs",
                "bw_fraction"} <= set(row)
        assert len(row["times_ms"]) == 1
        diff = row["max_abs_diff"]
        assert diff is None or diff < 1e-3, row  # every formulation computes the same thing
    mem = {(m["method"], m["shape"], m["impl"]): m for m in r["memory"]}
    assert mem[("bn", "4x32x4x4", "plain")]["saved_bytes"] > 0
    assert r["targets"]["judged"] == len([c for c in r["cells"] if "target_met" in c])


def test_bad_arguments() -> None:
    assert B.main(["--shapes", "3x3x3", "--json", "/dev/null"]) == 2
    assert B.main(["--modes", "sideways", "--json", "/dev/null"]) == 2


def test_whitening_mode(tmp_path, capsys) -> None:
    path = tmp_path / "w.json"
    rc = B.main(["--whitening", "--whitening-shapes", "8x32x4x4", "64x32", "--whitening-groups", "8,16",
                 "--repeats", "1", "--threads", "1", "--plain", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "whitening" in out and "targets met" in out
    r = json.loads(path.read_text())
    w = r["whitening"]
    assert "cells" not in r and {"cpu", "threads"} <= set(r["machine"])
    assert not w["errors"], w["errors"]
    rows = {(x["method"], x["group_size"], x["shape"]): x for x in w["rows"]}
    assert set(rows) == {(m, d, s) for m in ("dbn", "pca_bw", "cd_bw", "iternorm") for d in (8, 16)
                         for s in ("8x32x4x4", "64x32")}
    for row in w["rows"]:
        assert set(row["medians_ms"]) == set(whitening.WHITENING_MODES)
        assert {"ours", "plain", "bn_torch"} <= set(row["medians_ms"]["fb-train"])
        assert "blockmm" in row["medians_ms"]["fwd-eval"]
        assert {"ours/BN", "plain/BN", "ours/plain", "eval/mm", "saved/in"} <= set(row["ratios"])
        assert row["saved_bytes"]["ours"] > 0 and row["saved_bytes"]["plain"] > 0
        # the papers' formulation computes what ours computes (PCA: up to eigenvector signs)
        n = row["numerics"]
        assert n["ok"] and n["max_abs_diff"] < 1e-3, row
        assert n["compared"] == ("cov(y)" if row["method"] == "pca_bw" else "y")
    # the targets are judged on its shape (128x64x16x16) only
    assert w["targets"]["judged"] == 0 and all(not x["targets"] for x in w["rows"])
    row = {"method": "dbn", "group_size": 16, "shape": "128x64x16x16",
           "ratios": {"ours/BN": 1.9, "eval/mm": 1.3, "saved/in": 1.0}}
    assert {(t["metric"], t["met"]) for t in whitening._whitening_targets(row)} == {
        ("ours/BN", True), ("eval/mm", False), ("saved/in", True)}
    assert whitening._whitening_targets({**row, "method": "iternorm", "group_size": 64}) != []
    assert whitening._whitening_targets({**row, "shape": "256x512"}) == []
    # a saved run prints again
    assert B.main(["--from-json", str(path), "--plain"]) == 0
    assert "targets met" in capsys.readouterr().out


def test_plain_whitening_matches_functional() -> None:
    from normkit.functional import whiten as W

    x = torch.randn(32, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    xc = (x - x.mean(0)).T.unsqueeze(0)
    for kind in ("zca", "cholesky", "newton"):
        p = reference.PlainWhitening(kind, 8, 8, eps=1e-5).double()
        want = (W.whitening_matrix(W.covariance(xc), kind, eps=1e-5) @ xc)[0].T
        assert torch.allclose(p(x), want, atol=1e-8), kind


def test_weights_mode(tmp_path) -> None:
    from normkit._bench.weights import LAYER_METHODS, run_weights, weights_report

    r = run_weights(batch=2, channels=4, size=4, ortho_shapes=((4, 36),), repeats=1, threads=1,
                    log=lambda s: None)
    assert not r["errors"], r["errors"]
    impls = {row["impl"] for row in r["layer"]}
    assert impls == {"plain", *LAYER_METHODS, "torch weight_norm", "torch spectral_norm"}
    assert all(row["median_ms"] > 0 for row in r["layer"])
    assert next(row for row in r["layer"] if row["impl"] == "plain")["ratio_plain"] == 1.0
    own, oni = (next(row for row in r["orthogonal"] if row["impl"] == k) for k in ("own", "oni"))
    assert own["orthogonality_error"] < 1e-3 and oni["orthogonality_error"] > 0
    assert "OWN (eigh) vs ONI" in weights_report(r)
    path = tmp_path / "w.json"
    assert B.main(["--weights", "--repeats", "1", "--threads", "1", "--plain", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["weights"]["layer"]


def test_deprecated_aliases() -> None:
    import importlib
    import sys

    for name, attr in (("normkit.benchmarking", "main"), ("normkit.bench_weight", "run_weights")):
        sys.modules.pop(name, None)
        with pytest.warns(DeprecationWarning, match="deprecated"):
            mod = importlib.import_module(name)
        assert getattr(mod, attr) is getattr(B, attr)

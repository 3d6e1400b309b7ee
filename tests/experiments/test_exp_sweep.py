"""Resumable sweeps and their reports."""

from __future__ import annotations

import json

import pytest

import normkit  # noqa: F401  (registers the methods)
from normkit.errors import ConfigError
from normkit.experiments import backends, sweep
from normkit.experiments.report import results_table, summarize, write_report
from normkit.experiments.runner import CompareConfig

PNG = b"\x89PNG\r\n\x1a\n"


def tiny(**kw) -> CompareConfig:
    return CompareConfig(**{"methods": ["bn", "none"], "dataset": "gaussian", "subset": 64,
                            "batch_sizes": [8, 16], "seeds": [0, 1], "epochs": 1, "lrs": None,
                            **kw})


@pytest.fixture
def counted(monkeypatch):
    """Count the runs actually trained."""
    calls = []
    real = backends.train_run

    def train_run(dataset, cfg, method, batch_size, seed, **kw):
        calls.append((method, batch_size, seed) if kw.get("lr") is None else
                     (method, batch_size, seed, kw["lr"], kw["phase"]))
        return real(dataset, cfg, method, batch_size, seed, **kw)

    monkeypatch.setattr(backends, "train_run", train_run)
    return calls


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_runs_the_grid_and_writes_config(tmp_path, counted):
    records = sweep.run_sweep(tiny(), tmp_path, show_progress=False)
    assert len(counted) == len(records) == 8
    assert {(r["method"], r["batch_size"], r["seed"]) for r in records} == set(counted)
    assert all(r["status"] == "ok" for r in records)
    assert len(lines(tmp_path / "results.jsonl")) == 8
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["grid"]["seeds"] == [0, 1] and config["settings"]["epochs"] == 1
    assert set(config["versions"]) == {"normkit", "torch", "numpy", "python"}


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, counted):
    sweep.run_sweep(tiny(seeds=[0]), tmp_path, show_progress=False)  # stopped after seed 0
    results = tmp_path / "results.jsonl"
    kept = results.read_text().splitlines()
    assert len(counted) == len(kept) == 4
    # a kill mid-write: the last finished run lost and a torn line left behind
    results.write_text("\n".join(kept[:3]) + "\n" + kept[3][:25])
    counted.clear()
    with pytest.warns(sweep.RejectedLinesWarning, match=r"^1 line of .* is not a run record"):
        records = sweep.run_sweep(tiny(), tmp_path, show_progress=False)
    assert (tmp_path / "results.rejected.jsonl").read_text() == kept[3][:25] + "\n"
    lost = json.loads(kept[3])
    expected = {(m, b, 1) for m in ("bn", "none") for b in (8, 16)}
    assert set(counted) == expected | {(lost["method"], lost["batch_size"], lost["seed"])}
    assert len(counted) == 5
    assert len(records) == 8 and len(lines(results)) == 8
    counted.clear()
    assert len(sweep.run_sweep(tiny(), tmp_path, show_progress=False)) == 8 and not counted


def test_other_settings_in_the_same_directory_are_refused(tmp_path):
    sweep.run_sweep(tiny(seeds=[0], batch_sizes=[16], methods=["none"]), tmp_path,
                    show_progress=False)
    with pytest.raises(ConfigError, match=r"holds results of different settings \(epochs: 1 "
                                          r"there, 2 now\); pass another --out"):
        sweep.prepare(tiny(epochs=2), tmp_path)
    assert len(lines(tmp_path / "results.jsonl")) == 1


def test_parallel_workers_give_the_same_runs(tmp_path):
    cfg = tiny(methods=["bn"], batch_sizes=[16], seeds=[0, 1])
    records = sweep.run_sweep(cfg, tmp_path, jobs=2, show_progress=False)
    assert [(r["seed"], r["status"]) for r in records] == [(0, "ok"), (1, "ok")]
    serial = sweep.run_sweep(cfg, tmp_path / "serial", show_progress=False)
    assert [r["history"][-1]["test_acc"] for r in serial] == pytest.approx(
        [r["history"][-1]["test_acc"] for r in records], abs=0.05)


def test_report_files(tmp_path):
    records = sweep.run_sweep(tiny(eval_batch_stats=True), tmp_path, show_progress=False)
    records.append({**records[0], "seed": 9, "status": "diverged", "error": "loss became nan",
                    "test_error": None, "history": []})
    paths = write_report(records, tmp_path, {"dataset": "gaussian", "model": "mlp",
                                             "summary": "tiny", "epochs": 1})
    for name in ("error_vs_batch_size.png", "training_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    html = paths["html"].read_text()
    assert html.count('src="data:image/png;base64,') == 2 and "http" not in html
    md = paths["markdown"].read_text()
    assert "| bn |" in md and "![error_vs_batch_size.png]" in md and "(2/3)" in md
    assert "loss became nan" in md and "batch statistics" in md
    csv = paths["csv"].read_text().splitlines()
    assert csv[0].startswith("method,batch_size,seed,status,test_error") and len(csv) == 10
    rows = summarize(records)
    assert [(r["method"], r["batch_size"], r["ok"]) for r in rows][:2] == [("bn", 8, 2),
                                                                           ("bn", 16, 2)]
    assert results_table(records).row_count == 4

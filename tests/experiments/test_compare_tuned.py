"""Tuned comparisons: the validation split, the lr choice, statistics and the recommendation."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from scipy import stats as sps

import normkit  # noqa: F401  (registers the methods)
from normkit.experiments import backends, sweep
from normkit.experiments.data import Dataset, load_dataset
from normkit.experiments.report import write_report
from normkit.experiments.runner import CompareConfig
from normkit.experiments.stats import interval, paired_p, recommend, recommendation_lines
from normkit.experiments.tuning import select_lrs, validation_split

PNG = b"\x89PNG\r\n\x1a\n"


def tuned(**kw) -> CompareConfig:
    return CompareConfig(**{"methods": ["bn", "none"], "dataset": "gaussian", "subset": 128,
                            "batch_sizes": [16], "seeds": [0, 1], "epochs": 1,
                            "lrs": [0.01, 0.3], "optimizer": "sgd", "lr_scaling": True,
                            "warmup": 0.0, "tune_seeds": None, **kw})  # SGD's lrs, linear


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = backends.train_run

    def train_run(dataset, cfg, method, batch_size, seed, **kw):
        calls.append((method, batch_size, seed, kw.get("lr"), kw.get("phase")))
        return real(dataset, cfg, method, batch_size, seed, **kw)

    monkeypatch.setattr(backends, "train_run", train_run)
    return calls


def test_validation_split_is_seeded_disjoint_and_leaves_the_test_set_out():
    ds = load_dataset("gaussian", subset=100)
    a, b = validation_split(ds, 0.25, seed=3), validation_split(ds, 0.25, seed=3)
    assert torch.equal(a.x_test, b.x_test) and len(a.x_test) == 25 and len(a.x_train) == 75
    rows = {tuple(x.tolist()) for x in ds.x_train}
    assert {tuple(x.tolist()) for x in a.x_test} | {tuple(x.tolist()) for x in a.x_train} == rows
    assert not {tuple(x.tolist()) for x in a.x_test} & {tuple(x.tolist()) for x in a.x_train}
    assert not torch.equal(validation_split(ds, 0.25, seed=4).x_test, a.x_test)


def test_tuned_sweep_validates_every_lr_then_tests_only_the_chosen(tmp_path, counted):
    records = sweep.run_sweep(tuned(), tmp_path, show_progress=False)
    val = [r for r in records if r["phase"] == "val"]
    test = [r for r in records if r["phase"] == "test"]
    assert len(val) == 2 * 2 * 2 and len(test) == 2 * 2 and len(counted) == 12
    assert all(r["test_error"] is None and r["val_error"] is not None for r in val)
    assert all("val_acc" in h and "test_acc" not in h for r in val for h in r["history"])
    chosen = select_lrs(records)
    assert {(r["method"], r["base_lr"]) for r in test} == {(m, chosen[m, 16]) for m in
                                                           ("bn", "none")}
    assert all(r["lr"] == pytest.approx(r["base_lr"] * 16 / 32) for r in records)
    # the test runs train on the whole training set, the validation runs on 80 % of it
    assert {r["steps"] for r in test} == {128 // 16} and {r["steps"] for r in val} == {102 // 16}
    counted.clear()
    assert len(sweep.run_sweep(tuned(), tmp_path, show_progress=False)) == 12 and not counted
    # a wider lr grid is the same settings: only the new validation runs (and maybe new tests)
    more = sweep.run_sweep(tuned(lrs=[0.01, 0.3, 0.1]), tmp_path, show_progress=False)
    assert {c[3] for c in counted if c[4] == "val"} == {0.1} and len(more) == 16


def test_tune_seeds_validates_the_first_seeds_then_tests_every_seed(tmp_path, counted):
    """``tune_seeds=1``: the validation grid runs for seed 0 only, its choice is tested on every
    seed; a later sweep tuning on every seed reuses the seed-0 validation runs and chooses on all
    of them, and going back to one tuning seed ignores the extra validation records again."""
    cfg = tuned(seeds=[0, 1, 2], tune_seeds=1)
    assert cfg.tuning_seeds() == [0] and tuned(seeds=[0, 1, 2]).tuning_seeds() == [0, 1, 2]
    records = sweep.run_sweep(cfg, tmp_path, show_progress=False)
    val = [r for r in records if r["phase"] == "val"]
    test = [r for r in records if r["phase"] == "test"]
    assert {r["seed"] for r in val} == {0} and len(val) == 2 * 2
    assert sorted((r["method"], r["seed"]) for r in test) == sorted(
        (m, s) for m in ("bn", "none") for s in (0, 1, 2))
    one = select_lrs(val)
    assert {(r["method"], r["base_lr"]) for r in test} == {(m, one[m, 16]) for m in ("bn", "none")}
    counted.clear()
    every = sweep.run_sweep(tuned(seeds=[0, 1, 2]), tmp_path, show_progress=False)
    assert {c[2] for c in counted if c[4] == "val"} == {1, 2}  # seed 0's are reused
    every_val = [r for r in every if r["phase"] == "val"]
    assert len(every_val) == 2 * 2 * 3
    chosen = select_lrs(every_val)
    assert {(r["method"], r["seed"], r["base_lr"]) for r in every if r["phase"] == "test"} == {
        (m, s, chosen[m, 16]) for m in ("bn", "none") for s in (0, 1, 2)}
    counted.clear()
    again = sweep.run_sweep(cfg, tmp_path, show_progress=False)
    assert not counted and [r for r in again if r["phase"] == "val"] == val


def test_tune_seeds_is_checked_and_parsed():
    from normkit.cli import build_parser
    from normkit.errors import ConfigError

    with pytest.raises(ConfigError, match="tune-seeds must be >= 1.*got 0"):
        tuned(tune_seeds=0).validate()
    parse = build_parser().parse_args
    assert parse(["compare", "--tune-seeds", "all"]).tune_seeds is None
    assert parse(["compare", "--tune-seeds", "2"]).tune_seeds == 2
    assert parse(["compare"]).tune_seeds == CompareConfig().tune_seeds == 1
    with pytest.raises(SystemExit):
        parse(["compare", "--tune-seeds", "0"])


def test_selection_never_reads_the_test_set(tmp_path):
    """Test labels shuffled (or test inputs replaced by noise): the validation runs and the
    chosen lrs are identical, only the test errors move."""
    cfg = tuned(methods=["bn", "ln", "none"])
    dataset, store = sweep.prepare(cfg, tmp_path / "a")
    clean = sweep.run_sweep(cfg, tmp_path / "a", show_progress=False, prepared=(dataset, store))
    g = torch.Generator().manual_seed(1)
    spoiled = Dataset(dataset.name, dataset.x_train, dataset.y_train,
                      torch.randn(dataset.x_test.shape, generator=g),
                      dataset.y_test[torch.randperm(len(dataset.y_test), generator=g)],
                      dataset.num_classes, dataset.source)
    store_b = sweep.ResultStore(tmp_path / "b", cfg)
    store_b.open(spoiled)
    other = sweep.run_sweep(cfg, tmp_path / "b", show_progress=False, prepared=(spoiled, store_b))
    strip = ("wall_s", "time_per_step_ms")

    def val(records):
        return [{k: v for k, v in r.items() if k not in strip} for r in records
                if r["phase"] == "val"]

    assert val(clean) == val(other)
    assert select_lrs(clean) == select_lrs(other)
    assert [r["test_error"] for r in clean if r["phase"] == "test"] != [
        r["test_error"] for r in other if r["phase"] == "test"]


def test_select_lrs_counts_failures_as_100_and_breaks_ties_low():
    def rec(lr, err, seed, status="ok"):
        return {"method": "bn", "batch_size": 8, "seed": seed, "phase": "val", "base_lr": lr,
                "status": status, "val_error": err}

    records = [rec(0.1, 10, 0), rec(0.1, 12, 1), rec(1.0, 5, 0), rec(1.0, None, 1, "diverged"),
               rec(0.3, 11, 0), rec(0.3, 11, 1), {"method": "bn", "batch_size": 8, "seed": 0,
                                                 "phase": "test", "base_lr": 3.0,
                                                 "status": "ok", "test_error": 0.0}]
    assert select_lrs(records) == {("bn", 8): 0.1}  # 11 = 11: the smaller lr; 1.0 has 52.5


def test_interval_and_paired_test_match_the_formulas():
    values = [3.0, 4.5, 3.5, 5.0]
    mean, lo, hi = interval(values)
    half = sps.t.ppf(0.975, 3) * statistics.stdev(values) / math.sqrt(4)
    assert (mean, lo, hi) == pytest.approx((4.0, 4.0 - half, 4.0 + half))
    assert interval([2.0]) == (2.0, None, None)
    worse, best = [5.0, 6.0, 5.5], [4.0, 4.8, 5.0]
    d = [w - b for w, b in zip(worse, best, strict=True)]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert paired_p(worse, best) == pytest.approx(sps.t.sf(t, 2))
    assert paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0 and paired_p([2.0, 3.0], [1.0, 2.0]) == 0.0
    assert paired_p([1.0], [0.0]) is None


def _recs(errors: dict[str, list[float | None]], bs: int = 8) -> list[dict]:
    return [{"method": m, "batch_size": bs, "seed": s, "phase": "test",
             "status": "ok" if e is not None else "diverged", "test_error": e}
            for m, errs in errors.items() for s, e in enumerate(errs)]


def test_recommendation_names_the_best_and_the_tied_with_evidence():
    recs = _recs({"gn": [3.1, 3.9, 3.3], "bn": [3.0, 4.0, 3.2], "ln": [3.5, 4.6, 3.9],
                  "none": [20.0, 25.0, 22.0], "frn": [1.0, None, 1.0]})
    (r,) = recommend(recs)
    assert (r.best, r.tied, r.missing) == ("bn", ["gn"], ["frn"])
    assert r.text() == "at batch size 8 on this task: bn (and gn: not significantly worse)"
    by = {e.method: e for e in r.evidence}
    assert by["none"].p < 0.05 and by["ln"].p < 0.05 and by["gn"].p >= 0.05
    assert by["none"].diff == pytest.approx(22.333333 - 3.4, abs=1e-5)
    line = recommendation_lines([r])[0]
    assert "none 22.3 %" in line and "not ranked (a seed did not finish): frn" in line


def test_one_seed_cannot_test_anything():
    (r,) = recommend(_recs({"bn": [3.0], "gn": [3.1]}))
    assert r.tied == [] and r.evidence[1].p is None
    assert "of one seed: nothing can be tested" in recommendation_lines([r])[-1]


def test_tuned_report_has_the_recommendation_and_the_lr_section(tmp_path):
    records = sweep.run_sweep(tuned(), tmp_path, show_progress=False)
    paths = write_report(records, tmp_path, {"dataset": "gaussian", "model": "mlp"})
    assert (tmp_path / "error_vs_lr.png").read_bytes()[:8] == PNG and "lr_plot" in paths
    md = paths["markdown"].read_text()
    assert "## Recommendation" in md and "at batch size 16 on this task:" in md
    assert "## Learning rate, tuned per method" in md and "![error_vs_lr.png]" in md
    assert "95 % t interval" in md
    assert md.count("| bn |") == 2  # the test table and the lr table; no validation rows
    html = paths["html"].read_text()
    assert html.count('src="data:image/png;base64,') == 3 and "<b>" in html

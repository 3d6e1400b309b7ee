"""The ``normkit`` command line: help, list, compare, bench and its errors."""

from __future__ import annotations

import json

import pytest

from normkit.cli import main, split_methods

COMPARE_OPTIONS = ["--methods", "--dataset", "--data-dir", "--model", "--batch-sizes", "--seeds",
                   "--epochs", "--lr", "--base-batch-size", "--no-lr-scaling", "--momentum",
                   "--weight-decay", "--subset", "--out", "--eval-batch-stats", "--jobs",
                   "--quiet", "--lrs", "--val-fraction", "--convert", "--backend", "--address",
                   "--device"]


def test_top_level_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("compare", "list", "bench"))


def test_compare_help_explains_every_option(capsys):
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    missing = [opt for opt in COMPARE_OPTIONS if opt not in out]
    assert not missing and "resumes" in out


def test_list_help(capsys):
    assert main(["list", "--help"]) == 0
    assert "--family" in capsys.readouterr().out


def test_bench_help_is_the_benchmark_s(capsys):
    assert main(["bench", "--help"]) == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_list_prints_the_catalog(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "bn" in out and "gn" in out and "family" in out


def test_list_unknown_family(capsys):
    assert main(["list", "--family", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown family 'nope'")


@pytest.mark.parametrize("args, message", [
    (["--methods", "bn,bnn"], r"error: unknown normalization method 'bnn'; did you mean"),
    (["--methods", "gn:num_groups=7"], r"error: method 'gn:num_groups=7' does not work in model "
                                       r"'mlp'.*divisible by num_groups \(7\)"),
    (["--methods", "in"], r"error: method 'in' does not work in model 'mlp'"),
    (["--model", "cnn2d"], r"error: cnn2d needs \(C, H, W\) images, but the dataset's "
                           r"examples have shape \(32,\); use --model cnn1d, resnet or mlp"),
    (["--momentum", "1.5"], r"error: momentum must be in \[0, 1\), got 1.5"),
    (["--batch-sizes", "2,x"], r"argument --batch-sizes: expected comma-separated integers"),
    (["--epochs", "0"], r"argument --epochs: must be > 0, got 0"),
    (["--dataset", "cifar"], r"error: unknown dataset 'cifar'; choose one of mnist1d, .* or give "
                             r"module:function"),
    (["--lrs", "0.1,-1"], r"argument --lrs: expected positive learning rates, got '0.1,-1'"),
    (["--lrs", "0.1", "--lr", "0.1"], r"argument --lr: not allowed with argument --lrs"),
    (["--val-fraction", "1.5"], r"error: the validation fraction must be in \(0, 1\), got 1.5"),
    (["--convert"], r"error: --convert replaces the norms of a user model"),
    (["--model", "nosuchmod:net"], r"error: cannot import 'nosuchmod' of 'nosuchmod:net': "
                                   r"ModuleNotFoundError"),
    (["--address", "auto"], r"error: --address is the Ray cluster's; add --backend ray"),
    (["--dataset", "mnist", "--data-dir", "{tmp}"], r"error: mnist data not found.*--data-dir"),
    (["--batch-sizes", "128"], r"error: batch size 128 exceeds the 64 training examples"),
    (["--batch-sizes", "60"], r"error: batch size 60 exceeds the 51 training examples left "
                              r"beside the validation split"),
])
def test_compare_errors_exit_2_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    argv = ["compare", "--dataset", "gaussian", "--subset", "64", "--methods", "bn",
            "--batch-sizes", "16", "--model", "mlp",
            "--out", str(out), *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(message, err), err
    assert not out.exists(), "nothing may be written before the checks pass"


def test_compare_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--dataset", "gaussian", "--subset", "64", "--methods", "bn,none",
            "--batch-sizes", "8,16", "--seeds", "0", "--epochs", "1", "--jobs", "1", "--lr", "0.1",
            "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "bs=8" in captured.out and "bn" in captured.out and "report:" in captured.err
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "results.jsonl", "results.csv", "report.md", "report.html",
            "error_vs_batch_size.png", "training_curves.png"} <= names
    assert main([*argv, "--quiet"]) == 0  # resumed: nothing left to train
    assert capsys.readouterr().out.strip() == str(out)
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert main([*argv, "--epochs", "2"]) == 2
    assert "holds results of different settings" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["settings"]["epochs"] == 1


def test_split_methods_keeps_spec_arguments_together():
    assert split_methods("bn, gn:num_groups=8,eps=1e-3 ,ln,none") == [
        "bn", "gn:num_groups=8,eps=1e-3", "ln", "none"]


def test_tables_are_printed_whole_on_a_narrow_console(monkeypatch, capsys):
    from normkit.cli import _print_whole
    from normkit.experiments.report import shift_table

    monkeypatch.setenv("COLUMNS", "40")
    rec = {"method": "gn:num_groups=8", "batch_size": 64, "status": "ok", "test_acc": 0.8391,
           "shift": {"rotation:30": {"as_is": 0.4527, "adabn": 0.5182, "ptbn": 0.5141,
                                     "tent": 0.4953}}}
    _print_whole(shift_table([rec, {**rec, "seed": 1, "test_acc": 0.8331}]), quiet=False)
    out = capsys.readouterr().out
    assert "…" not in out
    for text in ("gn:num_groups=8", "rotation:30", "16.4 ± 0.4", "54.7 ± 0.0", "48.2 ± 0.0",
                 "48.6 ± 0.0", "50.5 ± 0.0"):
        assert text in out, text

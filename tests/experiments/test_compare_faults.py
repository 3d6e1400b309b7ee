"""Faults of ``normkit compare``: foreign lines in the results, OS errors, atomic files."""

from __future__ import annotations

import errno
import json
import os

import pytest

from normkit.cli import _summary, main
from normkit.experiments import backends, files, report, sweep
from normkit.experiments.runner import CompareConfig

PNG = b"\x89PNG\r\n\x1a\n"


def argv(out, *extra):
    return ["compare", "--dataset", "gaussian", "--subset", "64", "--methods", "bn,none",
            "--batch-sizes", "16", "--seeds", "0", "--epochs", "1", "--jobs", "1", "--lr", "0.1",
            "--out", str(out), *extra]


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_foreign_lines_are_moved_aside_with_a_warning_and_the_rerun_succeeds(tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "run"
    assert main(argv(out, "--quiet")) == 0
    good = (out / "results.jsonl").read_text().splitlines()
    foreign = ["42", "null", json.dumps({"method": "bn", "seed": 0, "config_hash": "x",
                                         "status": "ok"}), "not json at all", "[1, 2]"]
    (out / "results.jsonl").write_text("\n".join([foreign[0], good[0], *foreign[1:], good[1]])
                                       + "\n")
    capsys.readouterr()
    trained = []
    monkeypatch.setattr(backends, "train_run", lambda *a, **k: trained.append(a) or {})
    assert main(argv(out, "--quiet")) == 0
    err = capsys.readouterr().err
    assert one_line(err).startswith("warning: 5 lines of ") and "moved to" in err
    assert not trained, "nothing finished is lost: both runs were kept"
    assert (out / "results.jsonl").read_text().splitlines() == good
    assert (out / "results.rejected.jsonl").read_text().splitlines() == foreign
    assert main(argv(out, "--quiet")) == 0 and "warning" not in capsys.readouterr().err


def test_read_only_directory_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):  # root ignores chmod: refuse the way a read-only mount does
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    assert main(argv(tmp_path / "run")) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {tmp_path / 'run'}: Permission denied;")


def test_disk_full_mid_sweep_keeps_the_finished_runs_and_the_rerun_completes(tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "run"
    real, calls = sweep.ResultStore.append, []

    def append(self, record):
        calls.append(record)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.results_path))
        real(self, record)

    monkeypatch.setattr(sweep.ResultStore, "append", append)
    assert main(argv(out, "--quiet")) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: cannot write") and "No space left on device" in line
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(sweep.ResultStore, "append", real)
    assert main(argv(out, "--quiet")) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(PNG + b"old")

    class Figure:
        def savefig(self, f, **kw):
            f.write(PNG[:4])
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        files.save_figure_atomic(Figure(), target)
    assert target.read_bytes() == PNG + b"old"

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        os.fsync = full
        with pytest.raises(OSError):
            files.write_text_atomic(tmp_path / "report.md", "half")
    finally:
        os.fsync = real
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    target.chmod(0o640)
    files.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o640
    fresh = files.write_text_atomic(tmp_path / "fresh.md", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask


def test_one_epoch_curves_and_summary(monkeypatch, tmp_path):
    figs = []
    monkeypatch.setattr(report, "save_figure_atomic", lambda fig, path, **kw: figs.append(fig))
    rec = {"method": "bn", "batch_size": 8, "seed": 0, "status": "ok", "history": [
        {"epoch": 1, "train_loss": 1.0, "test_acc": 0.5}]}
    report.plot_training_curves([rec], tmp_path / "c.png")
    for ax in figs[0].axes:
        assert ax.get_xlim() == (0.5, 1.5) and list(ax.get_xticks()) == [1]
    cfg = CompareConfig(epochs=1, lrs=None)

    class Data:
        name, x_train, x_test = "d", [0] * 3, [0] * 2

    text = _summary(cfg, Data())
    assert "1 epoch," in text and "1 epochs" not in text
    assert "2 epochs," in _summary(CompareConfig(epochs=2), Data())

"""Covariate shifts of the test set and ``normkit compare --shift``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import normkit  # noqa: F401  (registers the methods)
from normkit.cli import main
from normkit.errors import ConfigError, ShapeError
from normkit.experiments.report import summarize_shift
from normkit.experiments.runner import CompareConfig
from normkit.experiments.shift import (
    ADAPTATIONS,
    SHIFTS,
    evaluate_shifts,
    parse_shifts,
    shift_inputs,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", SHIFTS)
@pytest.mark.parametrize("shape", [(6, 40), (6, 2, 40), (6, 1, 12, 12)])
def test_shifts_are_deterministic_and_keep_shape_and_dtype(name, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y = shift_inputs(x, name)
    assert torch.equal(y, shift_inputs(x.clone(), name))
    assert y.shape == x.shape and y.dtype == x.dtype and not torch.equal(y, x)


def test_contrast_scales_each_example_toward_its_mean():
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    y = shift_inputs(x, "contrast", severity=0.25)
    dims = (1, 2, 3)
    assert torch.allclose(y.mean(dims), x.mean(dims), atol=1e-12)
    assert torch.allclose(y.std(dims), 0.25 * x.std(dims), atol=1e-12)
    assert torch.allclose(shift_inputs(x, "contrast", severity=1.0), x, atol=1e-12)


def test_noise_is_seeded_gaussian_of_the_given_std():
    x = torch.zeros(200, 100)
    y = shift_inputs(x, "noise", severity=0.5, seed=3)
    # std of 20000 N(0, 0.25) draws: 0.5 ± 0.5/√(2·20000) = ±0.0025; 6 sigma
    assert y.mean().item() == pytest.approx(0.0, abs=6 * 0.5 / math.sqrt(20000))
    assert y.std().item() == pytest.approx(0.5, abs=6 * 0.5 / math.sqrt(40000))
    assert not torch.equal(y, shift_inputs(x, "noise", severity=0.5, seed=4))


def test_blur_is_a_normalized_gaussian_along_the_signal_or_image_axes():
    s = 1.5
    radius = math.ceil(3 * s)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / s) ** 2)
    kernel /= kernel.sum()
    x = torch.zeros(1, 41, dtype=torch.float64)
    x[0, 20] = 1.0  # an impulse gives the kernel
    y = shift_inputs(x, "blur", severity=s)
    assert torch.allclose(y[0, 20 - radius:21 + radius], kernel, atol=1e-12)
    assert y[0, :20 - radius].abs().max() == 0 and y.sum().item() == pytest.approx(1.0)
    img = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    img[0, 0, 10, 10] = 1.0  # 2-D: the outer product of the kernel
    y2 = shift_inputs(img, "blur", severity=s)[0, 0, 10 - radius:11 + radius, 10 - radius:11 + radius]
    assert torch.allclose(y2, torch.outer(kernel, kernel), atol=1e-12)
    const = torch.full((2, 3, 9), 2.5, dtype=torch.float64)  # reflected borders keep constants
    assert torch.allclose(shift_inputs(const, "blur", severity=3.0), const, atol=1e-12)


def test_rotation_is_a_circular_shift_for_signals_and_a_rotation_for_images():
    x = torch.arange(40.0).view(1, 40)
    assert torch.equal(shift_inputs(x, "rotation", severity=90), torch.roll(x, 10, dims=-1))
    assert torch.equal(shift_inputs(x, "rotation"), torch.roll(x, 3, dims=-1))  # 30° of 40
    img = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    r90 = shift_inputs(img, "rotation", severity=90)
    assert torch.allclose(r90, torch.rot90(img, 1, dims=(2, 3)), atol=1e-9)
    assert torch.allclose(shift_inputs(img, "rotation", severity=360), img, atol=1e-9)


def test_parse_shifts_and_errors():
    assert parse_shifts("noise, contrast:0.5") == [("noise", 0.5), ("contrast", 0.5)]
    with pytest.raises(ConfigError, match=r"unknown shift 'fog'; choose among contrast, noise"):
        parse_shifts("noise,fog")
    with pytest.raises(ConfigError, match=r"severity of shift 'contrast' must be in \[0, 1\], "
                                          r"got 2.0"):
        parse_shifts("contrast:2")
    with pytest.raises(ConfigError, match=r"severity after ':' must be a number, got 'x'"):
        parse_shifts("blur:x")
    with pytest.raises(ConfigError, match=r"shift 'noise' is given twice"):
        parse_shifts("noise,noise")
    with pytest.raises(ShapeError, match=r"got shape \(5,\)"):
        shift_inputs(torch.randn(5), "noise")


def test_evaluate_shifts_adapts_copies_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model.train()(torch.randn(64, 8))  # some running statistics
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(50, 8), torch.randint(0, 3, (50,))
    res = evaluate_shifts(model, x, y, parse_shifts("noise,contrast:0.5"), batch_size=20)
    assert list(res) == ["noise", "contrast:0.5"]
    assert all(set(row) == set(ADAPTATIONS) and all(0 <= v <= 1 for v in row.values())
               for row in res.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    gn = nn.Sequential(nn.Linear(8, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3)).eval()
    row = evaluate_shifts(gn, x, y, [("noise", 0.5)])["noise"]
    assert row["adabn"] is None and row["ptbn"] is None and row["tent"] is not None
    plain = evaluate_shifts(nn.Linear(8, 3), x, y, [("noise", 0.5)])["noise"]
    assert [k for k, v in plain.items() if v is not None] == ["as_is"]


def test_shift_is_a_setting_only_when_set():
    assert "shift" not in CompareConfig().settings()
    cfg = CompareConfig(shift="noise, blur:1.0,contrast:0.5")
    cfg.validate()
    assert cfg.shift == "noise,blur,contrast:0.5" and cfg.settings()["shift"] == cfg.shift
    assert cfg.config_hash() != CompareConfig().config_hash()
    with pytest.raises(ConfigError, match="--shift evaluates in one process"):
        CompareConfig(shift="noise", nproc=2).validate()


def test_compare_with_shift_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--dataset", "gaussian", "--subset", "128", "--methods", "bn,none",
            "--batch-sizes", "16", "--seeds", "0,1", "--epochs", "1", "--jobs", "1",
            "--lr", "0.1", "--shift", "noise,contrast", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "under shift" in captured.out and "AdaBN" in captured.out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    bn = next(r for r in records if r["method"] == "bn")
    assert set(bn["shift"]) == {"noise", "contrast"}
    assert all(v is not None for v in bn["shift"]["noise"].values())
    none = next(r for r in records if r["method"] == "none")
    assert none["shift"]["noise"]["adabn"] is None
    md = (out / "report.md").read_text()
    assert "| method | shift | clean | as is | AdaBN | PTBN | TENT |" in md
    assert "| bn | contrast |" in md and "![shift.png](shift.png)" in md
    assert (out / "shift.png").read_bytes()[:8] == PNG
    assert (out / "report.html").read_text().count('src="data:image/png;base64,') == 3
    assert "shift_noise_adabn_error" in (out / "results.csv").read_text().splitlines()[0]
    rows = summarize_shift(records)
    assert len(rows) == 4 and rows[0]["ok"] == 2
    assert json.loads((out / "config.json").read_text())["settings"]["shift"] == "noise,contrast"


def test_compare_shift_errors_and_help(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", "--dataset", "gaussian", "--subset", "64", "--shift", "fog",
                 "--out", str(out)]) == 2
    assert "error: unknown shift 'fog'" in capsys.readouterr().err and not out.exists()
    assert main(["compare", "--help"]) == 0
    assert "--shift" in capsys.readouterr().out


def test_default_compare_output_has_no_shift_section(tmp_path):
    out = tmp_path / "run"
    assert main(["compare", "--dataset", "gaussian", "--subset", "64", "--methods", "none",
                 "--batch-sizes", "16", "--seeds", "0", "--epochs", "1", "--jobs", "1",
                 "--lr", "0.1", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "results.jsonl").read_text())
    assert "shift" not in record and not (out / "shift.png").exists()
    assert "shift" not in (out / "report.md").read_text()
    assert "shift" not in (out / "results.csv").read_text()

"""The user's own model and data: ``module:function`` specs, ``--convert`` and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.cli import main
from normkit.errors import ConfigError
from normkit.experiments import compare
from normkit.experiments.data import load_dataset
from normkit.experiments.models import build_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "compare_own_model.py"
MODEL, STOCK, DATA = (f"{EXAMPLE}:{f}" for f in ("tiny_cnn", "stock_cnn", "noisy_waves"))


def net(norm_layer, input_shape, num_classes):
    """A user model of this test module (importable as tests' module in workers)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 16), norm_layer(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def datasets():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 6, generator=g), torch.randint(0, 3, (120,), generator=g)
    x[torch.arange(120), y] += 3.0
    return (torch.utils.data.TensorDataset(x[:90], y[:90]),
            torch.utils.data.TensorDataset(x[90:], y[90:]))


def test_the_example_model_and_data_are_compared_by_one_command(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["compare", "--model", MODEL, "--dataset", DATA, "--methods", "bn,gn:num_groups=4,none",
            "--batch-sizes", "32", "--seeds", "0,1", "--epochs", "1", "--lr", "0.3",
            "--jobs", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "recommendation:" in printed and "at batch size 32 on this task:" in printed
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["model"] == MODEL and config["dataset"]["input_shape"] == [32]


def test_norm_layer_is_the_method_and_convert_replaces_stock_norms():
    model = build_model(MODEL, (32,), 4, "gn:num_groups=4")
    norms = [m for m in model.modules() if isinstance(m, nk.GroupNorm)]
    assert [m.num_groups for m in norms] == [4, 4]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in build_model(MODEL, (32,), 4, "none")
                   .modules())
    converted = build_model(STOCK, (32,), 4, "ln", convert=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in converted.modules())
    assert sum(isinstance(m, nk.LayerNorm) for m in converted.modules()) == 2
    plain = build_model(STOCK, (32,), 4, "none", convert=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert plain(torch.randn(3, 32)).shape == (3, 4)


def test_datasets_of_pairs_are_loaded_as_given():
    ds = load_dataset(f"{__name__}:datasets")
    train, test = datasets()
    assert torch.equal(ds.x_train, train.tensors[0]) and torch.equal(ds.y_test, test.tensors[1])
    assert ds.num_classes == 3 and ds.input_shape == (6,)


@pytest.mark.parametrize("spec, match", [
    ("nosuch_module_xyz:f", r"cannot import 'nosuch_module_xyz' of 'nosuch_module_xyz:f'"),
    (f"{__name__}:missing", r"has no function 'missing'"),
    ("/no/such/file.py:f", r"no file /no/such/file.py"),
    (f"{__name__}:bad_data", r"bad_data returned int; return \(x_train, y_train, x_test, "),
    (f"{__name__}:float_labels", r"labels must be a non-empty 1-D integer tensor"),
])
def test_bad_user_specs_name_the_spec_and_the_fix(spec, match):
    with pytest.raises(ConfigError, match=match):
        load_dataset(spec)


def bad_data():
    return 42


def float_labels():
    return torch.zeros(4, 2), torch.zeros(4), torch.zeros(2, 2), torch.zeros(2)


def test_a_model_that_is_not_a_module_is_refused():
    with pytest.raises(ConfigError, match=r"returned int, not a torch.nn.Module"):
        build_model(f"{__name__}:bad_data_model", (4,), 2, "bn")


def bad_data_model(norm_layer, input_shape, num_classes):
    return 0


def test_python_api_takes_the_functions_and_returns_the_records(tmp_path):
    records = compare(model=net, dataset=datasets, methods=["bn", "none"], batch_sizes=[15],
                      seeds=[0, 1], epochs=2, lrs=[0.1, 1.0], subset=None, out=tmp_path, jobs=1)
    # the validation grid with the first seed (tune_seeds=1, the default), every seed tested
    assert [r["phase"] for r in records].count("test") == 4 and len(records) == 8
    assert {r["seed"] for r in records if r["phase"] == "val"} == {0}
    assert (tmp_path / "report.md").exists() and (tmp_path / "error_vs_lr.png").exists()
    with pytest.raises(ConfigError, match=r"not a module-level function"):
        compare(model=lambda norm_layer, input_shape, num_classes: None, dataset=datasets,
                out=tmp_path / "x")

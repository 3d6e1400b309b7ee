"""The optimizer settings of ``normkit compare``: --optimizer, --warmup, --lr-scaling."""

from __future__ import annotations

import math

import pytest
import torch

from normkit.cli import build_parser
from normkit.errors import ConfigError
from normkit.experiments import runner
from normkit.experiments.data import load_dataset
from normkit.experiments.runner import CompareConfig, lr_schedule, train_run


@pytest.fixture(scope="module")
def gaussian():
    return load_dataset("gaussian", subset=256)


def tiny(**kw) -> CompareConfig:
    return CompareConfig(**{"methods": ["bn"], "dataset": "gaussian", "epochs": 1, "model": "mlp",
                            "base_batch_size": 64, "lrs": None, "subset": None,
                            "optimizer": "sgd", "lr_scaling": True, "warmup": 0.0, **kw})


def _lrs(total: int, warmup: float) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched, seen = lr_schedule(opt, total, warmup), []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_warmup_rises_linearly_then_follows_the_cosine():
    total, w = 20, 4  # warmup 0.2 of 20 steps
    expected = [2.0 * (t + 1) / w for t in range(w)] + [
        2.0 * 0.5 * (1 + math.cos(math.pi * (t - w) / (total - w))) for t in range(w, total)]
    assert _lrs(total, 0.2) == pytest.approx(expected, abs=1e-12)


def test_no_warmup_is_torchs_cosine_annealing():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)
    expected = []
    for _ in range(12):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(12, 0.0) == expected


@pytest.mark.parametrize("scaling, lr8", [(True, 0.1 * 8 / 32), ("linear", 0.1 * 8 / 32),
                                          ("sqrt", 0.1 * 0.5), (False, 0.1)])
def test_lr_scaling_rules(scaling, lr8):
    cfg = CompareConfig(lr=0.1, lrs=None, lr_scaling=scaling)
    cfg.validate()
    assert cfg.run_lr(8) == pytest.approx(lr8) and cfg.run_lr(32) == pytest.approx(0.1)


def test_settings_hash_only_when_changed_and_linear_is_true():
    base = tiny()
    assert "optimizer" not in base.settings() and "warmup" not in base.settings()
    assert tiny(lr_scaling="linear").config_hash() == base.config_hash()
    hashes = {tiny(optimizer=o).config_hash() for o in ("sgd", "adam", "adamw")}
    others = {tiny(warmup=0.1).config_hash(), tiny(lr_scaling="sqrt").config_hash()}
    assert len(hashes | others) == 5


@pytest.mark.parametrize("kw, match", [
    ({"optimizer": "rmsprop"}, r"unknown optimizer 'rmsprop'; choose one of sgd, adam, adamw"),
    ({"optimizer": "adam", "gradient": "lamb"}, r"--gradient lamb replaces the optimizer"),
    ({"lr_scaling": "cubic"}, r"lr_scaling must be one of .* got 'cubic'"),
    ({"warmup": 1.0}, r"warmup must be a share of the training steps in \[0, 1\), got 1.0"),
    ({"warmup": -0.1}, r"got -0.1"),
    ({"optimizer": "adam", "momentum": 0.5}, r"momentum 0.5 is SGD's, but the optimizer is 'adam'"),
])
def test_bad_optimizer_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw).validate()


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_trains_with_warmup(gaussian, monkeypatch, name, cls):
    made = []
    original = runner._optimizer
    monkeypatch.setattr(runner, "_optimizer", lambda *a: made.append(original(*a)) or made[-1])
    record = train_run(gaussian, tiny(optimizer=name, lr=3e-3, warmup=0.25,
                                      lr_scaling="sqrt", weight_decay=1e-4), "bn", 16, seed=0)
    assert record["status"] == "ok" and record["lr"] == pytest.approx(3e-3 * 0.5)
    assert type(made[0]) is cls and made[0].defaults["weight_decay"] == 1e-4
    assert record["test_error"] < 60  # the gaussian classes are separable: it learned


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["compare", "--optimizer", "adamw", "--warmup", "0.05",
                                      "--lr-scaling", "sqrt"])
    assert (args.optimizer, args.warmup, args.lr_scaling) == ("adamw", 0.05, "sqrt")
    assert build_parser().parse_args(["compare", "--no-lr-scaling"]).lr_scaling == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--no-lr-scaling", "--lr-scaling", "linear"])


def test_the_default_is_adam_with_warmup_and_sqrt_scaling_and_lars_keeps_working():
    d = CompareConfig()
    assert (d.optimizer, d.lr_scaling, d.warmup, d.lrs) == ("adam", "sqrt", 0.1, [0.01, 0.03])
    assert d.settings()["optimizer"] == "adam"  # hashed: results of SGD runs are never mixed in
    args = build_parser().parse_args(["compare", "--gradient", "lars"])
    assert args.optimizer is None  # _compare_run then takes SGD, which LARS replaces


def test_the_report_summary_names_the_optimizer_scaling_and_warmup():
    from normkit.cli import _summary

    class Data:
        name, x_train, x_test = "gaussian", [0] * 8, [0] * 4

    text = _summary(CompareConfig(), Data())
    assert "Adam with the lr tuned" in text and "square root of the batch size" in text
    assert "a linear warmup over 10% of the steps, then cosine decay" in text
    sgd = _summary(CompareConfig(optimizer="sgd", lr_scaling=True, warmup=0.0), Data())
    assert "SGD (momentum 0.9)" in sgd and "scaled linearly" in sgd and "warmup" not in sgd

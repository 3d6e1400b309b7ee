"""One training run and the compare configuration."""

from __future__ import annotations

import sys

import pytest
import torch

import normkit
from normkit.errors import ConfigError, UnknownMethodError
from normkit.experiments import runner
from normkit.experiments.data import load_dataset
from normkit.experiments.runner import CompareConfig, canonical_method, train_run


@pytest.fixture(scope="module")
def gaussian():
    return load_dataset("gaussian", subset=256)


def tiny(**kw) -> CompareConfig:
    """One quick untuned run; SGD at lr 0.1 scaled linearly (the tests below pin SGD's numbers)."""
    return CompareConfig(**{"methods": ["bn"], "dataset": "gaussian", "epochs": 1, "model": "mlp",
                            "base_batch_size": 64, "lrs": None, "subset": None, "lr": 0.1,
                            "optimizer": "sgd", "lr_scaling": True, "warmup": 0.0, **kw})


def test_tiny_run_trains_and_records_everything(gaussian):
    record = train_run(gaussian, tiny(epochs=2), "bn", batch_size=16, seed=0)
    assert record["status"] == "ok" and record["error"] is None
    assert record["steps"] == 2 * (256 // 16) and len(record["history"]) == 2
    assert record["lr"] == pytest.approx(0.1 * 16 / 64)
    assert 0 <= record["test_error"] <= 100 and record["test_error"] < 60
    assert record["time_per_step_ms"] > 0 and record["num_params"] > 0
    assert set(record["history"][0]) == {"epoch", "train_loss", "train_acc", "test_loss",
                                         "test_acc"}


def test_same_seed_same_result_and_lr_scaling_off(gaussian):
    cfg = tiny(lr_scaling=False)
    a, b = (train_run(gaussian, cfg, "bn", 8, seed=3) for _ in range(2))
    assert a["history"] == b["history"] and a["lr"] == 0.1


def test_batch_stats_eval_leaves_eval_mode_metrics_alone(gaussian):
    plain = train_run(gaussian, tiny(), "bn", 8, seed=0)
    both = train_run(gaussian, tiny(eval_batch_stats=True), "bn", 8, seed=0)
    assert both["test_acc"] == plain["test_acc"] and both["history"] == plain["history"]
    assert 0 <= both["test_error_batch_stats"] <= 100
    assert "test_error_batch_stats" not in plain


def test_nan_loss_is_recorded_as_diverged(gaussian):
    record = train_run(gaussian, tiny(lr=1e6, lr_scaling=False), "none", 32, seed=0)
    assert record["status"] == "diverged" and "loss became" in record["error"]
    assert record["test_error"] is None


def test_exception_in_a_run_is_recorded_as_failed(gaussian):
    record = train_run(gaussian, tiny(), "bn", batch_size=1, seed=0)  # BN needs 2 samples
    assert record["status"] == "failed"
    assert record["error"].startswith("ShapeError: Expected more than 1 value")


def test_any_exception_is_caught(gaussian, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nlong torch trace")

    monkeypatch.setattr(runner, "build_model", broken)
    record = train_run(gaussian, tiny(), "bn", 8, seed=0)
    assert (record["status"], record["error"]) == ("failed", "RuntimeError: out of memory")


def test_canonical_method():
    assert canonical_method("GN: num_groups=8") == "gn:num_groups=8"
    assert canonical_method("gn:eps=1e-3,num_groups=4") == "gn:eps=0.001,num_groups=4"
    assert canonical_method("None") == "none"
    with pytest.raises(ConfigError, match="'none' takes no arguments"):
        canonical_method("none:eps=1")
    with pytest.raises(UnknownMethodError, match="'bnn'"):
        canonical_method("bnn")


@pytest.mark.parametrize("kw, match", [
    ({"batch_sizes": []}, r"list of batch sizes is empty"),
    ({"batch_sizes": [4, 0]}, r"batch sizes must be ≥ 1, got \[4, 0\]"),
    ({"seeds": [1, 1]}, r"list of seeds has duplicates: \[1, 1\]"),
    ({"methods": ["gn", "GroupNorm"]}, r"names one method twice"),
    ({"lr": -1.0}, r"lr must be > 0, got -1.0"),
    ({"momentum": 1.5}, r"momentum must be in \[0, 1\), got 1.5"),
    ({"epochs": 0}, r"epochs must be ≥ 1, got 0"),
    ({"dataset": "cifar"}, r"unknown dataset 'cifar'"),
    ({"model": "vit"}, r"unknown model 'vit'"),
    ({"data_dir": "/data"}, r"--data-dir is only read by mnist and fashion-mnist"),
    ({"gradient": "adam"}, r"unknown gradient method 'adam'; choose one of gc, block, agc, lars"),
    ({"weight": "oni:iterations=0"}, r"iterations must be an int in \[1, 64\], got 0"),
    ({"input_norm": "minmax"}, r"unknown input normalization 'minmax'; choose one of center"),
    ({"input_norm": "pca", "model": "cnn1d"}, r"--input-norm pca gives flat \(N, k\) inputs"),
    ({"population": "svd"}, r"unknown population whitening 'svd'"),
    ({"population": "pca", "weight": "ws"}, r"drop --weight and --nproc"),
    ({"refresh_every": 5}, r"--refresh-every applies to --population layers"),
    ({"population": "pca", "refresh_every": 0}, r"refresh_every must be an int ≥ 1, got 0"),
])
def test_bad_config_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw).validate()


def test_config_hash_ignores_the_grid_only():
    base = tiny()
    assert tiny(methods=["ln"], seeds=[5], batch_sizes=[3]).config_hash() == base.config_hash()
    assert tiny(dataset="mnist", data_dir="/x").settings() == tiny(dataset="mnist").settings()
    assert tiny(epochs=2).config_hash() != base.config_hash()


def test_unknown_weight_method_is_refused():
    with pytest.raises(UnknownMethodError, match="spectral"):
        tiny(weight="spectral").validate()


def test_weight_and_gradient_settings_hash_only_when_set():
    assert "weight" not in tiny().settings() and "gradient" not in tiny().settings()
    assert tiny(weight="ws").config_hash() != tiny().config_hash()
    assert tiny(gradient="gc").config_hash() != tiny(gradient="lars").config_hash()


@pytest.mark.parametrize("gradient", [None, *runner.GRADIENT_METHODS])
def test_weight_and_gradient_methods_train(gaussian, gradient):
    # LARS steps by lr·η·‖w‖ (η = 1e-3): its learning rates are ~100× SGD's; LAMB's are Adam's
    lr = {"lars": 10.0, "lamb": 0.01}.get(gradient or "", 0.05)
    cfg = tiny(weight="ws", gradient=gradient, lr_scaling=False, lr=lr)
    cfg.validate()
    record = train_run(gaussian, cfg, "gn:num_groups=4", batch_size=16, seed=0)
    assert record["status"] == "ok", record["error"]
    assert record["test_error"] < 60


def test_weight_method_skips_the_output_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = runner._optimizer(model, tiny(weight="sn", gradient="lars"), 0.1)
    assert normkit.weight.is_normalized(model[0]) and not normkit.weight.is_normalized(model[2])
    assert type(opt).__name__ == "LARS"


def test_batch_larger_than_training_set_is_refused():
    ds = load_dataset("gaussian", subset=20)
    cfg = tiny(batch_sizes=[64])
    cfg.validate()
    with pytest.raises(ConfigError, match=r"batch size 64 exceeds the 20 training examples"):
        runner.validate_methods(ds, cfg)



def test_data_parallel_run_matches_one_process(gaussian):
    """``nproc=2``: DDP on half batches with synchronized BN computes the one-process run (up to
    float32 summation order over a few dozen steps: 1e-4 relative on the losses)."""
    one = train_run(gaussian, tiny(lr_scaling=False), "bn", batch_size=16, seed=0)
    two = train_run(gaussian, tiny(lr_scaling=False, nproc=2), "bn", batch_size=16, seed=0)
    assert two["status"] == "ok", two["error"]
    assert two["steps"] == one["steps"]
    for a, b in zip(one["history"], two["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)


def test_nproc_validation():
    with pytest.raises(ConfigError, match=r"nproc must be an int ≥ 1, got 0"):
        tiny(nproc=0).validate()
    with pytest.raises(ConfigError, match=r"every batch size must be ≥ nproc \(4\)"):
        tiny(nproc=4, batch_sizes=[2]).validate()
    assert "nproc" not in tiny().settings() and tiny(nproc=2).settings()["nproc"] == 2


def test_analyze_records_the_output_layer_and_leaves_training_alone(gaussian):
    plain = train_run(gaussian, tiny(epochs=2), "bn", batch_size=16, seed=0)
    analyzed = train_run(gaussian, tiny(epochs=2, analyze=True), "bn", batch_size=16, seed=0)
    assert analyzed["status"] == "ok", analyzed["error"]
    for a, b in zip(plain["history"], analyzed["history"], strict=True):
        assert a == {k: v for k, v in b.items() if k != "analysis"}  # the copy is analyzed
        info = b["analysis"]
        assert info["x_lambda_max"] > 0 and info["weight_norm"] > 0 and info["layer"]
        assert info["effective_lr"] >= 0  # the cosine schedule ends at lr = 0
    assert analyzed["history"][0]["analysis"]["effective_lr"] > 0
    assert analyzed["history"][0]["analysis"]["angular_update"] is None  # no previous epoch
    assert analyzed["history"][1]["analysis"]["angular_update"] > 0
    assert tiny(analyze=True).config_hash() != tiny().config_hash()
    with pytest.raises(ConfigError, match="--analyze runs in one process"):
        tiny(analyze=True, nproc=2).validate()


def test_report_has_the_analysis_table(gaussian, tmp_path):
    from normkit.experiments.report import write_report

    records = [train_run(gaussian, tiny(analyze=True), m, batch_size=16, seed=0) for m in ("bn", "none")]
    paths = write_report(records, tmp_path, {"dataset": "gaussian", "model": "mlp", "summary": ""})
    text = paths["markdown"].read_text()
    assert "Output layer at the end of training (--analyze)" in text
    assert "| bn |" in text and "| none |" in text


def test_input_norm_and_population_settings_hash_only_when_set():
    for key in ("input_norm", "population", "refresh_every"):
        assert key not in tiny().settings()
    assert tiny(input_norm="zca").config_hash() != tiny(input_norm="standardize").config_hash()
    assert (tiny(population="pca", refresh_every=10).config_hash()
            != tiny(population="pca").config_hash())


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_input_norm_whitens_the_training_inputs_in_front_of_the_model(gaussian, method,
                                                                      monkeypatch):
    seen = []
    real = runner.build_model

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(runner, "build_model", spy)
    cfg = tiny(input_norm=method)
    cfg.validate()
    record = train_run(gaussian, cfg, "bn", batch_size=16, seed=0)
    assert record["status"] == "ok", record["error"]
    norm = normkit.InputNormalizer(method=method).fit(gaussian.x_train)
    z = norm(gaussian.x_train).double().flatten(1)
    torch.testing.assert_close(torch.cov(z.T, correction=0), torch.eye(z.shape[1],
                               dtype=torch.float64), atol=1e-3, rtol=0)  # float32 fit
    with torch.no_grad():  # the trained model is normalizer → network
        model = torch.nn.Sequential(norm, seen[0]).eval()
        assert runner.evaluate(model, gaussian.x_test, gaussian.y_test)[1] == pytest.approx(
            record["test_acc"])


def test_population_layers_are_refreshed_every_t_steps(gaussian, monkeypatch):
    from normkit import population

    calls = []
    real = population.refresh

    def counting(model, batches, **kw):
        calls.append(len(list(population.population_layers(model))))
        return real(model, batches, **kw)

    monkeypatch.setattr(population, "refresh", counting)
    # RefreshEvery calls the function of its own module (normkit.population._refresh)
    monkeypatch.setattr(sys.modules["normkit.population._refresh"], "refresh", counting)
    cfg = tiny(population="zca", refresh_every=4)
    cfg.validate()
    record = train_run(gaussian, cfg, "none", batch_size=16, seed=0)
    assert record["status"] == "ok", record["error"]
    steps = 256 // 16
    plain = runner.build_model("mlp", gaussian.input_shape, gaussian.num_classes, "none")
    linear = sum(isinstance(m, torch.nn.Linear) for m in plain.modules())
    assert len(calls) == 1 + steps // 4  # before training, then every 4 steps
    assert set(calls) == {linear}  # every Linear became a whitened layer
    # the same run with plain layers (measured: 85.9% against 37.5%, seed 0, 16 steps)
    assert record["test_error"] < train_run(gaussian, tiny(), "none", batch_size=16,
                                            seed=0)["test_error"] - 20

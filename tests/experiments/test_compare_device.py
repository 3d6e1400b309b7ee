"""``normkit compare --device``: the option's values, what this machine has, the settings hash, the
Ray task's GPU request, and a run on the CPU named explicitly. (A run on CUDA or MPS itself needs
such a device, which the test machines do not have.)"""

from __future__ import annotations

import argparse

import pytest
import torch

from normkit._cli_values import device_spec
from normkit.cli import main
from normkit.errors import ConfigError
from normkit.experiments.backends import check_backend, ray_resources
from normkit.experiments.config import CompareConfig, check_device
from normkit.experiments.data import load_dataset
from normkit.experiments.runner import train_run


def tiny(**kw: object) -> CompareConfig:
    base = dict(methods=["bn"], dataset="gaussian", batch_sizes=[16], seeds=[0], epochs=1,
                lrs=None)
    return CompareConfig(**(base | kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("text, value", [("cpu", "cpu"), ("CUDA", "cuda"), (" cuda:1 ", "cuda:1"),
                                         ("mps", "mps")])
def test_device_spec_accepts_the_forms(text: str, value: str) -> None:
    assert device_spec(text) == value


@pytest.mark.parametrize("text", ["tpu", "cuda:x", "cpu:0", "mps:1", "", "cuda:"])
def test_device_spec_refuses_other_forms(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda, cuda:N or mps"):
        device_spec(text)


def _missing_cuda() -> str:
    """A CUDA device this machine does not have, and the message that refuses it."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.device_count()}"
    return "cuda"


def test_check_device_refuses_a_device_this_machine_lacks() -> None:
    check_device("cpu")
    device = _missing_cuda()
    match = "this machine has" if torch.cuda.is_available() else "no CUDA device is available"
    with pytest.raises(ConfigError, match=match):
        check_device(device)
    check_device(device, here=False)  # the form alone: a Ray worker may have it
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        check_device("tpu", here=False)
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="MPS is not available"):
            check_device("mps")


def test_local_backend_checks_the_device_here_and_ray_leaves_it_to_the_workers() -> None:
    device = _missing_cuda()
    with pytest.raises(ConfigError, match="cuda"):
        check_backend("local", None, device)
    with pytest.raises(ConfigError, match="use --device cuda with --backend ray"):
        check_backend("ray", None, "cuda:0")


def test_the_command_refuses_a_missing_device_before_training(tmp_path, capsys) -> None:
    code = main(["compare", "--dataset", "gaussian", "--device", _missing_cuda(), "--quiet",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_device_is_a_setting_hashed_only_off_the_cpu() -> None:
    assert "device" not in tiny().settings()  # earlier (CPU) results keep their hash
    assert tiny(device="cpu").config_hash() == tiny().config_hash()
    assert tiny(device="cuda").settings()["device"] == "cuda"
    assert tiny(device="cuda").config_hash() != tiny().config_hash()


def test_data_parallel_processes_stay_on_the_cpu() -> None:
    with pytest.raises(ConfigError, match="drop --nproc or use --device cpu"):
        tiny(device="cuda", nproc=2, batch_sizes=[16]).validate()


def test_ray_tasks_ask_for_a_gpu_only_with_cuda() -> None:
    assert ray_resources(tiny(), 1)["num_gpus"] == 0
    assert ray_resources(tiny(device="cuda"), 2) == {"num_cpus": 2, "num_gpus": 1,
                                                     "max_retries": 0}


def test_dataset_to_moves_every_split_and_keeps_itself_in_place() -> None:
    data = load_dataset("gaussian", subset=64)
    assert data.to("cpu") is data
    moved = data.to(torch.device("meta"))
    assert {t.device.type for t in (moved.x_train, moved.y_train, moved.x_test, moved.y_test)} \
        == {"meta"}
    assert moved.input_shape == data.input_shape and moved.num_classes == data.num_classes


def test_a_cpu_run_named_explicitly_is_the_default_run() -> None:
    data = load_dataset("gaussian", subset=256)
    a = train_run(data, tiny(), "bn", batch_size=32, seed=0)
    b = train_run(data, tiny(device="cpu"), "bn", batch_size=32, seed=0)
    assert a["status"] == b["status"] == "ok"
    assert a["test_loss"] == b["test_loss"] and a["history"] == b["history"]


"""Where a command runs: :func:`check_device` refuses a device name of the wrong form or, on this
machine, one it does not have (``normkit compare --device``, ``normkit bench --device``); torch
alone."""

from __future__ import annotations

import torch

from .errors import ConfigError

__all__ = ["check_device"]


def check_device(device: str, *, here: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``device`` is ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or
    ``"mps"`` and, with ``here``, names a device this machine has (saying what it has instead;
    without ``here`` the form alone: a Ray cluster's workers have their own devices).

    Example:
        >>> check_device("cpu")
        >>> check_device("tpu")
        Traceback (most recent call last):
        ...
        normkit.errors.ConfigError: unknown device 'tpu'; choose cpu, cuda, cuda:N or mps
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or mps")
    if not here:
        return
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = torch.version.cuda
            raise ConfigError(f"device {device!r}: no CUDA device is available (torch "
                              f"{torch.__version__} is built "
                              f"{'for CUDA ' + built if built else 'without CUDA'}); use --device "
                              f"cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: MPS is not available on this machine (Apple "
                          f"silicon and a torch built with MPS); use --device cpu")

"""The user's own model and data in ``normkit compare``: ``module:function`` specs.

A spec names a function as ``package.module:function`` (imported) or ``path/to/file.py:function``
(loaded from the file). Models and datasets are given by spec, never by object, so every worker
process or Ray task builds its own from the same string.

* ``--model SPEC``: ``function(norm_layer=..., input_shape=..., num_classes=...) -> nn.Module``,
  where ``norm_layer`` is the method under test as a factory ``norm_layer(num_features, **kw)``
  (:func:`normkit.partial` of the preset; ``nn.Identity`` for ``none``), the drop-in convention of
  torchvision and timm;
* ``--model SPEC --convert``: ``function(input_shape=..., num_classes=...) -> nn.Module`` builds a
  stock model whose normalization layers :func:`normkit.convert` replaces by the method (by
  ``nn.Identity`` for ``none``);
* ``--dataset SPEC``: ``function() -> (x_train, y_train, x_test, y_test)`` (tensors or arrays) or
  ``(train, test)`` ``torch.utils.data.Dataset`` s of ``(x, label)`` pairs, loaded whole into
  memory; inputs are used as given (not standardized), labels are integers from 0.

Example (``examples/compare_own_model.py`` holds a model and a dataset; its functions are given
by file path here)::

    normkit compare --model examples/compare_own_model.py:tiny_cnn \\
        --dataset examples/compare_own_model.py:noisy_waves --methods bn,gn:num_groups=4,none
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import registry
from ..errors import ConfigError

__all__ = ["is_spec", "spec_of", "load_callable", "norm_layer", "build_user_model",
           "load_user_dataset"]


def is_spec(name: str) -> bool:
    """Whether a ``--model`` / ``--dataset`` value is a ``module:function`` spec."""
    return ":" in name


def spec_of(fn: Callable[..., Any] | str) -> str:
    """The spec of a module-level function (``"pkg.mod:fn"``); a string is returned as is.

    Raises:
        ConfigError: for a lambda or a nested function (other processes could not find it).
    """
    if isinstance(fn, str):
        return fn
    qual = getattr(fn, "__qualname__", "")
    if "<" in qual or not getattr(fn, "__module__", None):
        raise ConfigError(f"{fn!r} is not a module-level function, so worker processes cannot "
                          "import it; define it at the top level of a module or file")
    module = fn.__module__
    if module == "__main__":  # a script: name it by its file so other processes can load it
        path = getattr(sys.modules["__main__"], "__file__", None)
        if path:
            return f"{Path(path).resolve()}:{qual}"
    return f"{module}:{qual}"


@functools.lru_cache(maxsize=32)
def load_callable(spec: str) -> Callable[..., Any]:
    """Import the function of a ``module:function`` or ``file.py:function`` spec.

    Raises:
        ConfigError: naming the spec, what went wrong and the expected form.
    """
    where, _, name = spec.rpartition(":")
    form = "expected package.module:function or path/to/file.py:function"
    if not where or not name:
        raise ConfigError(f"{spec!r} is not a module:function spec; {form}")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise ConfigError(f"{spec!r}: no file {path}; {form}")
            mod_name = f"_normkit_user_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as err:  # any import failure is the user's module: say so in one line
        raise ConfigError(f"cannot import {where!r} of {spec!r}: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}; {form}") from err
    fn: Any = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"{where!r} has no function {name!r} (from {spec!r}); {form}")
    return fn


def norm_layer(method: str) -> Callable[..., nn.Module]:
    """The method as a ``norm_layer`` factory: :func:`normkit.partial` of the preset with the
    spec's arguments, or ``nn.Identity`` (which ignores its arguments) for ``none``."""
    name, kwargs = registry.parse_spec(method)
    if name.lower() == "none":
        return functools.partial(nn.Identity)
    return registry.partial(name, **kwargs)


def build_user_model(spec: str, input_shape: tuple[int, ...], num_classes: int, method: str, *,
                     convert: bool = False) -> nn.Module:
    """Build the user's model of ``spec`` with ``method`` (see the module docstring).

    Raises:
        ConfigError: when the function does not return an ``nn.Module``.
    """
    fn = load_callable(spec)
    if convert:
        model = fn(input_shape=tuple(input_shape), num_classes=num_classes)
        _check_module(model, spec)
        from ..apply.convert import convert as nk_convert

        to: Any = (lambda c: nn.Identity()) if method == "none" else method
        return nk_convert(model, to, inplace=True)
    model = fn(norm_layer=norm_layer(method), input_shape=tuple(input_shape),
               num_classes=num_classes)
    _check_module(model, spec)
    return model


def _check_module(model: Any, spec: str) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")


def _tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a map-style Dataset of ``(x, label)`` pairs into two tensors."""
    xs, ys = zip(*(data[i][:2] for i in range(len(data))), strict=True)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(
        [int(y) for y in ys])


def load_user_dataset(spec: str) -> tuple[np.ndarray | torch.Tensor, ...]:
    """Call the user's dataset function; returns ``(x_train, y_train, x_test, y_test, source)``.

    Raises:
        ConfigError: when it returns anything but 4 arrays or 2 Datasets, or arrays whose
            lengths or label types do not fit, naming what it got.
    """
    out = load_callable(spec)()
    if isinstance(out, tuple | list) and len(out) == 2:
        (x_train, y_train), (x_test, y_test) = _tensors(out[0]), _tensors(out[1])
    elif isinstance(out, tuple | list) and len(out) == 4:
        x_train, y_train, x_test, y_test = (torch.as_tensor(np.asarray(a)) if not isinstance(
            a, torch.Tensor) else a for a in out)
    else:
        raise ConfigError(f"{spec} returned {type(out).__name__}"
                          f"{f' of length {len(out)}' if hasattr(out, '__len__') else ''}; "
                          "return (x_train, y_train, x_test, y_test) or (train, test) Datasets")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y) or y.ndim != 1 or y.is_floating_point() or len(y) == 0:
            raise ConfigError(f"{spec}: {split} inputs of shape {tuple(x.shape)} and labels of "
                              f"shape {tuple(y.shape)}, dtype {y.dtype}; labels must be a "
                              "non-empty 1-D integer tensor, one per input")
        if int(y.min()) < 0:
            raise ConfigError(f"{spec}: {split} labels must be ≥ 0, got {int(y.min())}")
    return x_train, y_train, x_test, y_test, spec

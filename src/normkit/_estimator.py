"""scikit-learn's estimator conventions for modules fitted on a data set, without importing
scikit-learn: ``get_params``/``set_params`` (so ``sklearn.base.clone`` and ``Pipeline`` work),
``fit_transform``, numpy in → numpy out, and deprecated aliases for renamed fitted attributes."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError

__all__ = ["EstimatorAPI", "deprecated_alias", "is_array", "to_tensor", "to_numpy"]


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array-like other than a tensor (numpy, or anything with
    ``__array__``: pandas, ...), which the estimator converts and answers in numpy."""
    return not isinstance(x, Tensor) and hasattr(x, "__array__")


def to_tensor(x: Any, device: torch.device) -> Tensor:
    """A tensor on ``device`` holding ``x`` (numpy array-like); integer and boolean data become
    float64, as scikit-learn's transformers do."""
    import numpy as np  # only reached with a non-tensor input

    a = np.asarray(x)
    if a.dtype.kind in "biu":
        a = a.astype(np.float64)
    elif a.dtype.kind not in "fc":
        raise ConfigError(f"expected numeric data, got a numpy array of dtype {a.dtype}; convert "
                          f"it with np.asarray(x, dtype=np.float64)")
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a).copy()
    return torch.from_numpy(a).to(device)


def to_numpy(t: Tensor) -> Any:
    """``t`` as a numpy array (detached, on the CPU)."""
    return t.detach().cpu().numpy()


def deprecated_alias(old: str, new: str) -> property:
    """A property ``old`` that reads and writes the attribute ``new`` with a
    ``DeprecationWarning``."""

    def fget(self: Any) -> Any:
        warnings.warn(f"{type(self).__name__}.{old} is deprecated; use .{new} (scikit-learn's "
                      f"trailing underscore for fitted attributes)", DeprecationWarning,
                      stacklevel=2)
        return getattr(self, new)

    def fset(self: Any, value: Any) -> None:
        warnings.warn(f"{type(self).__name__}.{old} is deprecated; use .{new}",
                      DeprecationWarning, stacklevel=2)
        setattr(self, new, value)

    return property(fget, fset, doc=f"Deprecated alias of ``{new}``.")


class EstimatorAPI:
    """Mixin: scikit-learn's parameter protocol over the constructor arguments named in
    ``_PARAMS`` (each stored unchanged under its own name by ``__init__``), and ``fit_transform``.

    ``set_params`` validates the new arguments as the constructor does and calls
    ``_configure()``, which rebuilds the module's state for them (the fit is dropped)."""

    _PARAMS: tuple[str, ...] = ()

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, by name (``deep`` is accepted for scikit-learn; there are no
        nested estimators)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params: Any) -> EstimatorAPI:
        """Set constructor arguments (validated as in ``__init__``); any change drops the fit.
        Returns ``self``."""
        unknown = sorted(set(params) - set(self._PARAMS))
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no parameter(s) {unknown}; valid: "
                              f"{list(self._PARAMS)}")
        merged = {**self.get_params(), **params}
        self._validate_params(**merged)
        if any(merged[k] is not getattr(self, k) and merged[k] != getattr(self, k) for k in params):
            for k, v in params.items():
                setattr(self, k, v)
            self._configure()
        return self

    def _validate_params(self, **params: Any) -> None:
        """Raise :class:`~normkit.errors.ConfigError` for bad constructor arguments."""

    def _configure(self) -> None:
        """(Re)build the state for the current constructor arguments."""

    def fit(self, x: Any, y: Any = None) -> Any:  # pragma: no cover - implemented by the class
        """Fit on ``x`` (rows are samples); returns ``self``."""
        raise NotImplementedError(f"{type(self).__name__} must define fit(x, y=None)")

    def transform(self, x: Any) -> Any:  # pragma: no cover - implemented by the class
        """Apply the fitted transform to ``x``."""
        raise NotImplementedError(f"{type(self).__name__} must define transform(x)")

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's estimator tags (a transformer, no target), for its utilities
        (``check_is_fitted``, ...). Only scikit-learn calls this, so importing it here keeps
        normkit free of the dependency."""
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=False),
                    transformer_tags=TransformerTags(preserves_dtype=["float64", "float32"]),
                    input_tags=InputTags(two_d_array=True, three_d_array=True))

    def fit_transform(self, x: Any, y: Any = None) -> Any:
        """``fit(x)`` then ``transform(x)`` of one tensor or array (``y`` is ignored, for
        scikit-learn's ``Pipeline``)."""
        if not (isinstance(x, Tensor) or is_array(x)):
            raise ConfigError(f"fit_transform needs one tensor or array, got "
                              f"{type(x).__name__}; for a loader call fit(loader), then "
                              f"transform each batch")
        return self.fit(x).transform(x)

"""Exceptions raised by normkit.

Every error a user can trigger with bad input is a :class:`ValueError` subclass whose message names
the values received and how to fix them, so ``except ValueError`` keeps working for callers that do
not know normkit.
"""

from __future__ import annotations

__all__ = ["NormkitError", "ConfigError", "ShapeError", "DTypeError", "UnknownMethodError"]


class NormkitError(ValueError):
    """Base class of every error normkit raises for bad input."""


class ConfigError(NormkitError):
    """A constructor or functional argument is invalid (raised at construction where possible)."""


class ShapeError(NormkitError):
    """An input tensor has the wrong rank, channel count or too few values for the statistics."""


class DTypeError(NormkitError):
    """An input tensor has a dtype normalization is not defined for (integer, bool)."""


class UnknownMethodError(NormkitError, KeyError):
    """A method name is not in the registry; the message lists the closest registered names."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""

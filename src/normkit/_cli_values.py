"""Value parsers of the ``normkit`` command's options (argparse ``type=`` functions): each
returns the parsed value or raises :class:`argparse.ArgumentTypeError` naming what it got and
what is allowed."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

__all__ = ["HelpFormatter", "count_or_all", "device_spec", "float_list", "int_list", "join",
           "positive", "split_methods"]


def split_methods(text: str) -> list[str]:
    """Split a ``--methods`` value into specs; a ``key=value`` piece continues the spec before.

    Example: ``split_methods("bn,gn:num_groups=8,eps=1e-3,none")`` ==
    ``["bn", "gn:num_groups=8,eps=1e-3", "none"]``.
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece and specs and ":" in specs[-1]:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    if not specs:
        raise argparse.ArgumentTypeError(f"no method in {text!r}; e.g. --methods bn,gn,ln,none")
    return specs


def int_list(text: str) -> list[int]:
    """Comma-separated integers (``--batch-sizes``, ``--seeds``).

    Example:
        >>> int_list("2, 8,16")
        [2, 8, 16]
    """
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,4,16,64, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """Comma-separated positive numbers (``--lrs``).

    Example:
        >>> float_list("0.01,0.03")
        [0.01, 0.03]
    """
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.03,0.1,0.3, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return values


def count_or_all(text: str) -> int | None:
    """A positive integer, or ``all`` for ``None`` (``--tune-seeds``, ``--subset``).

    Example:
        >>> count_or_all("3"), count_or_all("ALL")
        (3, None)
    """
    if text.strip().lower() == "all":
        return None
    return int(positive(int)(text))


def positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    """A parser of ``kind`` values that must be > 0 (``positive(int)`` for ``--epochs``).

    Example:
        >>> positive(float)("0.5")
        0.5
    """

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only where there is a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool) or "default" in (
                action.help or ""):
            return action.help
        return super()._get_help_string(action)


def join(values: list[int] | list[float]) -> str:
    """The inverse of :func:`int_list` / :func:`float_list`: ``[2, 8]`` -> ``"2,8"``."""
    return ",".join(map(str, values))


def device_spec(text: str) -> str:
    """A ``--device`` value: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (its form only; whether the
    device exists is checked with the rest of the configuration)."""
    value = text.strip().lower()
    if re.fullmatch(r"cpu|mps|cuda(:\d+)?", value) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return value

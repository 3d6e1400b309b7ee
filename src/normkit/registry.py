"""The method registry: every normalization by name.

Names ignore case, ``-`` and ``_`` (``"Batch-Norm"`` == ``"batchnorm"``). Every registered method is
a class constructible as ``cls(num_features, **kw)``, so any of them can be passed as a model
library's ``norm_layer=``::

    >>> import normkit as nk
    >>> layer = nk.create("gn", 64, num_groups=8)
    >>> type(layer).__name__
    'GroupNorm'
    >>> nk.create("gn:num_groups=8", 64).num_groups    # a spec string carries keyword arguments
    8
    >>> norm_layer = nk.partial("gn", num_groups=8)   # functools.partial of the class
    >>> norm_layer(32).num_groups
    8
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from .errors import ConfigError, UnknownMethodError

__all__ = [
    "MethodInfo",
    "register",
    "get",
    "info",
    "create",
    "partial",
    "list_methods",
    "list_families",
    "parse_spec",
    "summary_of",
]

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method.

    Attributes:
        name: canonical registry name (e.g. ``"gn"``).
        cls: the preset class, constructible as ``cls(num_features, **kw)``.
        family: catalog family (``"standardization"``, ``"scaling"``, ``"local"``, ...).
        aliases: other accepted names.
        paper: short citation of the paper that introduced the method.
        summary: the first paragraph of the class docstring, whole, on one line, its inline
            reStructuredText as Markdown code (:func:`summary_of`).
    """

    name: str
    cls: type
    family: str
    aliases: tuple[str, ...] = ()
    paper: str = ""
    summary: str = field(default="", compare=False)


_METHODS: dict[str, MethodInfo] = {}
_KEYS: dict[str, str] = {}  # normalized key (name or alias) -> canonical name


_ROLE = re.compile(r":(?:py:)?[a-z]+:`~?([^`<]*?)\s*(?:<[^`>]*>)?`")


def summary_of(doc: str | None) -> str:
    r"""The summary of a docstring: its first paragraph whole, on one line, as plain Markdown.

    RST inline literals ````x```` become ```x```, a role ``:class:`~a.b.C``` becomes ```C```; the
    paragraph is never cut mid-sentence (``normkit list`` and the docs' method tables show it).

    Example:
        >>> summary_of("Scale by ``g``, see\n    :class:`~normkit.nrr.Affine`.\n\n    More.")
        'Scale by `g`, see `Affine`.'
    """
    paragraph = inspect.cleandoc(doc or "").split("\n\n", 1)[0]
    text = " ".join(line.strip() for line in paragraph.splitlines())
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    return _ROLE.sub(lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def register(
    name: str, *, family: str, aliases: tuple[str, ...] = (), paper: str = ""
) -> Callable[[T], T]:
    """Class decorator adding a preset to the registry under ``name`` and ``aliases``.

    Raises:
        ConfigError: if the name or an alias is already taken by another class.
    """

    def decorator(cls: T) -> T:
        meta = MethodInfo(name, cls, family, tuple(aliases), paper, summary_of(cls.__doc__))
        names = (name, *aliases)
        for n in names:  # check every name before writing any, so a failure changes nothing
            k = _key(n)
            if k in _KEYS and _KEYS[k] != name and _METHODS[_KEYS[k]].cls is not cls:
                raise ConfigError(f"method name {n!r} is already registered to {_KEYS[k]!r}")
        for n in names:
            _KEYS[_key(n)] = name
        _METHODS[name] = meta
        return cls

    return decorator


def _lookup(name: str) -> MethodInfo:
    k = _key(name)
    if k not in _KEYS:
        close = difflib.get_close_matches(k, list(_KEYS), n=5, cutoff=0.5)
        names = sorted({_KEYS[c] for c in close})
        hint = f"; did you mean {', '.join(repr(n) for n in names)}?" if names else ""
        raise UnknownMethodError(
            f"unknown normalization method {name!r}{hint} "
            f"(normkit.list_methods() lists all {len(_METHODS)} methods)"
        )
    return _METHODS[_KEYS[k]]


def info(name: str) -> MethodInfo:
    """The :class:`MethodInfo` of a registered method (by name or alias)."""
    return _lookup(name)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` into the name and its keyword arguments.

    Values are Python literals (``8``, ``1e-5``, ``True``, ``None``, ``'x'``); anything else is
    kept as a string. Example: ``parse_spec("gn:num_groups=8")`` == ``("gn", {"num_groups": 8})``.

    Raises:
        ConfigError: on an argument that is not of the form ``key=value``.
    """
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ConfigError(
                f"bad argument {part!r} in method spec {spec!r}: expected key=value, "
                f"e.g. 'gn:num_groups=8,eps=1e-5'"
            )
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name.strip(), kwargs


def get(method: str | type | functools.partial | None) -> Callable[..., nn.Module] | None:
    """Resolve ``method`` to a callable ``f(num_features, **kw) -> nn.Module``.

    Accepts a registered name or spec string (``"gn:num_groups=8"``), a class, a
    ``functools.partial`` of one (returned as is), or ``None`` (returned as is: no normalization).

    Raises:
        UnknownMethodError: for an unknown name, listing the closest registered names.
        ConfigError: for any other type.
    """
    if method is None or isinstance(method, (type, functools.partial)):
        return method
    if isinstance(method, str):
        name, kwargs = parse_spec(method)
        cls = _lookup(name).cls
        return functools.partial(cls, **kwargs) if kwargs else cls
    raise ConfigError(
        f"expected a method name, class, functools.partial or None, got {type(method).__name__}"
    )


def create(
    method: str | type | functools.partial, num_features: int, /, **kwargs: Any
) -> nn.Module:
    """Build a registered method: ``create("gn", 64, num_groups=8)``.

    Keyword arguments override those of a spec string or partial.
    """
    factory = get(method)
    if factory is None:
        raise ConfigError("create() needs a method, got None; use torch.nn.Identity() for none")
    return factory(num_features, **kwargs)


def partial(method: str | type, /, **kwargs: Any) -> functools.partial:
    """``functools.partial`` of the preset class with keyword arguments only.

    Model libraries call ``norm_layer(num_features)`` and may rebind a partial's keywords, so the
    result carries no positional arguments.
    """
    factory = get(method)
    if isinstance(factory, functools.partial):
        return functools.partial(factory.func, **{**factory.keywords, **kwargs})
    if factory is None:
        raise ConfigError("partial() needs a method, got None")
    return functools.partial(factory, **kwargs)


def list_methods(family: str | None = None) -> list[str]:
    """Sorted canonical names of registered methods, optionally of one family.

    Raises:
        ConfigError: for a family no method belongs to, listing the known families.
    """
    if family is not None and family not in list_families():
        raise ConfigError(f"unknown family {family!r}; known families: {list_families()}")
    return sorted(n for n, m in _METHODS.items() if family is None or m.family == family)


def list_families() -> list[str]:
    """Sorted names of the families that have at least one registered method."""
    return sorted({m.family for m in _METHODS.values()})

"""The report of :func:`normkit.apply.convert.convert`: one row per converted layer, and the
layers that looked like normalization but were refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["ConversionReport", "ConvertedLayer"]


@dataclass(frozen=True)
class ConvertedLayer:
    """One row of a :class:`ConversionReport`.

    Attributes:
        path: dotted path of the layer in the model (``""`` for the model itself).
        old: type of the replaced layer.
        new: the replacement, as its type and the keyword arguments it was built with.
        kept: parameters and buffers carried over (``"running_cov←diag(running_var)"`` where a
            statistic was mapped into another form, ``"weight←1+weight"`` for a ``(1 + weight)``
            gain).
        dropped: ``(name, reason)`` of the old layer's tensors that were not carried over.
        fresh: tensors of the new layer left at their initial values.
        recognized: what the old layer computes and how that was found
            (``"BN + drop, act (probe)"``, ``"LN over the last dim (class)"``).
        tail: the old layer's modules kept after the new norm, in order (``"act=SiLU"``): the
            replacement is then a :class:`~normkit.apply.recognize.NormAct`.
        equivalent: whether the replacement computes the same function by construction (same
            kind, layout, groups, eps); then ``verified`` must hold or :func:`convert` raises.
        verified: whether the evaluation outputs of old and new were measured equal, on a
            random probe in float32 (``max|Δ| ≤ 1e-5·max|y|``); ``None`` when the new module
            could not run on the old layer's input.
        max_diff: that ``max|Δ|`` (``None`` when not measured).
    """

    path: str
    old: str
    new: str
    kept: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]
    fresh: tuple[str, ...]
    recognized: str = ""
    tail: tuple[str, ...] = ()
    equivalent: bool = False
    verified: bool | None = None
    max_diff: float | None = None


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`~normkit.apply.convert.convert` changed: one :class:`ConvertedLayer` per
    replaced layer, in model order, and ``refused``: ``(path, reason)`` of every module that looks
    like a normalization layer but was left as it is (also warned about). ``str(report)`` is a
    table; ``report[path]`` a row by path."""

    layers: tuple[ConvertedLayer, ...]
    refused: tuple[tuple[str, str], ...] = ()

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[ConvertedLayer]:
        return iter(self.layers)

    def __getitem__(self, path: str) -> ConvertedLayer:
        for row in self.layers:
            if row.path == path:
                return row
        refused = dict(self.refused)
        if path in refused:
            raise KeyError(f"layer {path!r} was not converted: {refused[path]}")
        raise KeyError(f"no converted layer at {path!r}; converted: {[r.path for r in self.layers]}")

    def __str__(self) -> str:
        head = ("path", "old", "new", "kept", "dropped (why)", "fresh", "then", "same output")
        rows = [(r.path or "<model>", r.old, r.new, ", ".join(r.kept) or "-",
                 "; ".join(f"{n}: {why}" for n, why in r.dropped) or "-", ", ".join(r.fresh) or "-",
                 ", ".join(r.tail) or "-",
                 "not run" if r.verified is None else
                 f"{'yes' if r.verified else 'no'} (max|Δ| {r.max_diff:.1e})")
                for r in self.layers]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        lines += [f"refused {p or '<model>'}: {why}" for p, why in self.refused]
        return "\n".join(line.rstrip() for line in lines)

"""Atomic file writes for run directories: a temp file in the same directory, then a rename;
and the figure and colour helpers every report plot starts from.

A reader (or a rerun after a kill, a full disk or a read-only directory) sees either the old file
or the whole new one, never a 0-byte PNG or half a report. Example::

    >>> import tempfile, pathlib
    >>> from normkit.experiments.files import write_text_atomic
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_text_atomic(d / "a.txt", "hello").read_text()
    'hello'
    >>> sorted(p.name for p in d.iterdir())  # no temp file left behind
    ['a.txt']
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_text_atomic", "save_figure_atomic", "new_figure",
           "method_colors"]


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (``os.replace`` of a flushed temp file).

    Raises:
        OSError: when the directory is not writable or the disk is full; ``path`` is then
            unchanged and the temp file removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode(path))  # mkstemp's 0600 would hide reports from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def _mode(path: Path) -> int:
    """The permissions of the file being replaced, or what ``open()`` would give a new one."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode())


def save_figure_atomic(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Render a matplotlib figure to PNG in memory, then write it with :func:`write_bytes_atomic`."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **kwargs)
    return write_bytes_atomic(path, buffer.getvalue())


def new_figure(ncols: int = 1, nrows: int = 1, figsize: tuple[float, float] | None = None,
               **kw: Any) -> tuple[Any, Any]:
    """A constrained-layout matplotlib figure with ``nrows × ncols`` axes (a 2-D array)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state, no display needed

    fig = Figure(figsize=figsize or (3.6 * ncols + 1.6, 3.0 * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def method_colors(methods: list[str]) -> dict[str, Any]:
    """One tab10 colour per method, in order (the same method, the same colour in every plot)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}

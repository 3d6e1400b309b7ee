"""A steady C allocator for timed runs: glibc's ``malloc`` keeps freed memory instead of handing
it back to the OS.

With glibc's defaults an activation-sized buffer freed at the end of one call is often unmapped
(``mmap`` chunks, heap trimming) and faulted in again, page by page, by a later call: ~2–3 ms per
8 MiB on the CPU machine, which is as long as a whole BN step at the goals shape, and which call
pays depends on the allocator's state, not on the code timed (the same compiled BN code read
1.09–1.82× compiled BN between runs). Raising ``M_MMAP_THRESHOLD`` to its maximum (32 MiB) and
``M_TRIM_THRESHOLD`` to 2 GiB keeps freed blocks for reuse, as the caching allocators PyTorch's
CPU performance guide recommends (jemalloc, tcmalloc) do; every implementation in a timed loop
runs under the same setting.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["steady_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def steady_allocator() -> str | None:
    """Set glibc's ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to 2 GiB for this
    process (for good: call it from a command, not a library); returns what was set, or ``None``
    where the C library is not glibc or refuses (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) != 1:
        return None
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 2 GiB (freed memory reused)"

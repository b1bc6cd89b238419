"""Handing freed heap back to the OS. glibc keeps freed pages in its arenas (one per thread that allocated, up to
8 x cores): after a burst of large decodes RSS stays high although nothing is in use. `malloc_trim(0)` returns
them; MALLOC_ARENA_MAX=2 (set in the Docker image) bounds the arenas themselves. See docs/reliability.md."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


def release_free_memory() -> bool:
    """malloc_trim(0) where glibc has it; True when it ran."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True

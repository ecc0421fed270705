"""glibc malloc arenas: how many this process may have.

By default every thread that allocates may get an arena of its own, up to
eight per core, and memory freed by one thread stays in the arena that made
it. A merge allocates its blocks on reader threads and frees them on others,
so with many arenas the freed blocks are scattered and the process keeps
them: a K = 8 TIES merge of the 0.6b family held 1.5 GiB that way, and 0.72
GiB with two arenas, at the same speed. The cap only holds for arenas made
after it, and the catalog's DuckDB threads make theirs when it opens, so the
command line sets it before anything else, and ``api.open_catalog`` before it
opens one; an engine call sets it too, for workers that open no catalog.
"""
from __future__ import annotations

import functools

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8   # mallopt's parameter number, from glibc's malloc.h


@functools.cache
def limit_malloc_arenas() -> None:
    """Cap glibc's malloc arenas for this process (the first call; without glibc, nothing)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass   # not glibc: nothing to cap

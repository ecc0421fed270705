"""Small file-system facts every layer relies on: durable renames, file hashes,
safe relative paths and whether a recorded process still runs."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath


def fsync_dir(path: str | Path) -> None:
    """Make a rename or file creation in a directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path, limit: int | None = None) -> str:
    """sha256 of a file (or of its first ``limit`` bytes)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def safe_relpath(rel: object) -> bool:
    """A shard name that stays inside its model folder: relative, no '..'."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == rel.rstrip("/")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

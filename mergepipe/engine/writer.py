"""A streaming safetensors writer: header first, then tensor bytes as produced.

The plan knows every output name, dtype and shape before any math runs, so the
header (in the official writer's order, padded to 8 bytes) is written up front
and the data is appended block by block; no shard is ever held in memory.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mergepipe.safetensors_format import layout


class ShardWriter:
    """Writes one shard; tensors must arrive in header order, bytes in row order."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        self.specs = specs
        prefix, self.offsets = layout(specs, metadata if metadata is not None else {"format": "pt"})
        self.f = open(path, "wb")
        self.f.write(prefix)
        self.bytes_written = len(prefix)
        self._index = 0
        self._remaining = self._size(0)
        self._hash = hashlib.blake2b(digest_size=16)
        self.hashes: dict[str, str] = {}
        self._advance()

    def _size(self, i: int) -> int:
        if i >= len(self.specs):
            return 0
        a, b = self.offsets[self.specs[i][0]]
        return b - a

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        expected = self.specs[self._index][0] if self._index < len(self.specs) else None
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        n = len(data)
        if n > self._remaining:
            raise RuntimeError(f"tensor {name!r}: {n} bytes exceed the {self._remaining} left")
        self.f.write(data)
        self._hash.update(data)
        self.bytes_written += n
        self._remaining -= n
        self._advance()

    def _advance(self) -> None:
        """Move past every tensor whose bytes are complete (empty ones included)."""
        while self._remaining == 0 and self._index < len(self.specs):
            self.hashes[self.specs[self._index][0]] = self._hash.hexdigest()
            self._hash = hashlib.blake2b(digest_size=16)
            self._index += 1
            self._remaining = self._size(self._index)

    def close(self) -> None:
        """Check completeness, flush and fsync: the file is durable on return."""
        if self._index < len(self.specs):
            raise RuntimeError(f"shard {self.path.name} closed before tensor "
                               f"{self.specs[self._index][0]!r} was complete")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()

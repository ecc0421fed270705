"""A streaming safetensors writer: header first, then tensor bytes as produced.

The plan knows every output name, dtype and shape before any math runs, so the
header (in the official writer's order, padded to 8 bytes) is written up front
and the data is appended block by block; no shard is ever held in memory.
Writing and hashing run on background threads (both release the GIL), so the
merge math of the next block overlaps the I/O of the last; short queues bound
the memory this costs.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from mergepipe.hashing import tensor_hasher
from mergepipe.safetensors_format import layout

_QUEUE_BLOCKS = 2
_WRITEBACK_BYTES = 64 << 20
_STOP = None


class _Stage:
    """One background thread applying ``fn`` to queued items, in order.

    An error is kept and raised to the producer by :meth:`check`; the thread
    keeps emptying its queue afterwards so the producer never blocks on it.
    """

    def __init__(self, name: str, fn):
        self.fn = fn
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUE_BLOCKS)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _STOP:
            if self.error is None:
                try:
                    self.fn(*item)
                except BaseException as e:
                    self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self) -> None:
        if self.thread.is_alive():
            self.queue.put(_STOP)
            self.thread.join()


class ShardWriter:
    """Writes one shard; tensors must arrive in header order, bytes in row order."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, phases: Any = None):
        self.path = path
        self.phases = phases   # an engine Phases: write, hash, queue_wait and fsync seconds
        self.specs = specs
        prefix, self.offsets = layout(specs, metadata if metadata is not None else {"format": "pt"})
        self.f = open(path, "wb")
        self.f.write(prefix)
        self.bytes_written = len(prefix)
        self._index = 0
        self._remaining = self._size(0)
        self.hashes: dict[str, str] = {}
        self._hash = tensor_hasher()
        # writing and hashing each get a thread: both release the GIL on big buffers
        self._flushed = 0
        self._stages = [_Stage(f"write-{path.name}", self._timed("write", self._write_block)),
                        _Stage(f"hash-{path.name}", self._timed("hash", self._hash_block))]
        self._send(b"")  # tensors of size 0 at the start are complete already

    def _timed(self, phase: str, fn):
        return fn if self.phases is None else self.phases.timed(phase, fn)

    def _size(self, i: int) -> int:
        if i >= len(self.specs):
            return 0
        a, b = self.offsets[self.specs[i][0]]
        return b - a

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (which the caller must not modify afterwards) for writing."""
        for stage in self._stages:
            stage.check()
        expected = self.specs[self._index][0] if self._index < len(self.specs) else None
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        n = len(data)
        if n > self._remaining:
            raise RuntimeError(f"tensor {name!r}: {n} bytes exceed the {self._remaining} left")
        self.bytes_written += n
        self._remaining -= n
        self._send(data)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Queue data plus the names of the tensors it completes (empty ones included)."""
        done = []
        while self._remaining == 0 and self._index < len(self.specs):
            done.append(self.specs[self._index][0])
            self._index += 1
            self._remaining = self._size(self._index)
        t = time.perf_counter()
        for stage in self._stages:
            stage.queue.put((data, done))
        if self.phases is not None:
            self.phases.add("queue_wait", time.perf_counter() - t)

    def _write_block(self, data: bytes | bytearray | memoryview, done: list[str]) -> None:
        self.f.write(data)
        end = self.f.tell()
        if end - self._flushed >= _WRITEBACK_BYTES:  # start writeback now, not all at fsync
            self.f.flush()
            os.posix_fadvise(self.f.fileno(), self._flushed, end - self._flushed,
                             os.POSIX_FADV_DONTNEED)
            self._flushed = end

    def _hash_block(self, data: bytes | bytearray | memoryview, done: list[str]) -> None:
        self._hash.update(data)
        for name in done:
            self.hashes[name] = self._hash.hexdigest()
            self._hash = tensor_hasher()

    def _join(self) -> None:
        for stage in self._stages:
            stage.join()

    def close(self) -> None:
        """Check completeness, flush and fsync: the file is durable on return."""
        self._join()
        for stage in self._stages:
            stage.check()
        if self._index < len(self.specs):
            raise RuntimeError(f"shard {self.path.name} closed before tensor "
                               f"{self.specs[self._index][0]!r} was complete")
        t = time.perf_counter()
        self.f.flush()
        os.fsync(self.f.fileno())
        if self.phases is not None:
            self.phases.add("fsync", time.perf_counter() - t)
        self.f.close()

    def abort(self) -> None:
        self._join()
        if not self.f.closed:
            self.f.close()

"""Positional reads of exact byte ranges, with a count of every byte read.

The budget guarantee is about physical I/O, so bytes are counted here, where
``os.preadv`` actually pulls them from the file — never estimated.

Every tensor read whole is also hashed here, on the very bytes the engine
merges, and compared with the hash recorded at registration: a file changed
in place (whatever its mtime says) fails the run before anything commits.
The engine reads a tensor's row blocks in order, so one incremental hash per
tensor suffices. A tensor read only in part (unselected blocks under an I/O
budget) cannot be checked against a whole-tensor hash; its use rests on the
size and mtime check made when the plan is built.

When the engine schedules its reads (:class:`ReadAhead`), background threads
read, hash and decode them while the merge thread does the math.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any

import torch

from mergepipe.hashing import TensorHasher, hasher_like
from mergepipe.errors import BadCheckpointError, MergePipeError, StaleModelError
from mergepipe.planner.plan import Read, Source
from mergepipe.files import safe_relpath
from mergepipe.safetensors_format import row_split, torch_dtype


class BlockReader:
    """Reads row ranges of tensors from the plan's sources; one fd per file."""

    def __init__(self, sources: list[Source], allow_nonfinite: bool = False,
                 phases: Any = None):
        self.sources = sources
        self.phases = phases       # an engine Phases (seconds per phase), or None
        self._hash_lock = threading.Lock()
        self.allow_nonfinite = allow_nonfinite
        self.bytes_read = [0] * len(sources)
        self._fds: dict[tuple[int, str], int] = {}
        self._hashing: dict[int, tuple[Read, TensorHasher, int]] = {}  # id(read) -> state
        self.checked_bytes = 0     # bytes whose tensor hash was compared with the catalog
        self.ahead: ReadAhead | None = None
        self._fd_lock = threading.Lock()

    def _fd(self, src: int, rel: str) -> int:
        key = (src, rel)
        with self._fd_lock:
            return self._fds[key] if key in self._fds else self._open(src, rel)

    def _open(self, src: int, rel: str) -> int:
        key = (src, rel)
        if key not in self._fds:
            if not safe_relpath(rel):
                raise BadCheckpointError(f"{self.sources[src].path}: shard {rel!r} lies outside "
                                         f"the model folder")
            path = Path(self.sources[src].path) / rel
            try:
                self._fds[key] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise MergePipeError(f"{path} is gone since it was registered")
        return self._fds[key]

    def raw(self, read: Read, start: int, nbytes: int, tensor: str | None = None) -> memoryview:
        """Exactly nbytes from the tensor's byte offset ``start``."""
        return self._get(read, start, nbytes, tensor, None)

    def rows(self, read: Read, shape: tuple[int, ...], a: int, b: int, tensor: str,
             device: torch.device | str = "cpu", native: bool = False) -> torch.Tensor:
        """Rows [a, b) of a tensor on ``device``: as float32, or ``native``ly in the
        file's float dtype (bf16 rows for a method that converts as it subtracts)."""
        row_bytes = row_split(shape, read.nbytes)[1]
        t = self._get(read, a * row_bytes, (b - a) * row_bytes, tensor,
                      (b - a, *shape[1:]) if shape else (), native)
        return t.to(device)

    def rows_bytes(self, read: Read, shape: tuple[int, ...], a: int, b: int,
                   tensor: str) -> memoryview:
        """Rows [a, b) as the file's bytes, checked finite: for output rows that are
        the base unchanged, which then need no decode and no encode."""
        row_bytes = row_split(shape, read.nbytes)[1]
        buf = self._get(read, a * row_bytes, (b - a) * row_bytes, tensor, None)
        if buf:
            with self._time("verify"):
                self._check_finite(torch.frombuffer(buf, dtype=torch_dtype(read.dtype)), read,
                                   tensor)
        return buf

    def _get(self, read: Read, start: int, nbytes: int, tensor: str | None,
             shape: tuple[int, ...] | None, native: bool = False) -> Any:
        """Bytes (``shape`` None) or rows: from the read-ahead thread when it was
        scheduled there, else read here; counted as read either way."""
        got = None
        if self.ahead is not None:
            with self._time("read"):   # the merge waits for its input
                got = self.ahead.take(read, start, nbytes, _form(shape, native))
        if got is None:
            got = self.fetch(read, start, nbytes, tensor, shape, native=native)
        self.bytes_read[read.src] += nbytes
        return got

    def fetch(self, read: Read, start: int, nbytes: int, tensor: str | None,
              shape: tuple[int, ...] | None, native: bool = False) -> Any:
        """Read, check against the registered hash, and decode when ``shape`` is given."""
        with self._time("read"):
            buf = self.pread(read, start, nbytes)
        return self.finish(read, start, buf, tensor, shape, native)

    def finish(self, read: Read, start: int, buf: memoryview, tensor: str | None,
               shape: tuple[int, ...] | None, native: bool = False) -> Any:
        """Check bytes read from ``start`` against the registered hash, and decode them
        when ``shape`` is given. A tensor's ranges must come in order for its hash to
        be checked, so the read-ahead runs this on one thread, in schedule order."""
        with self._time("verify"):
            self._check_hash(read, start, buf, tensor)
        if shape is None:
            return buf
        with self._time("decode"):
            return self._to_float(buf, read, shape, tensor or "", native)

    def pread(self, read: Read, start: int, nbytes: int) -> memoryview:
        """The physical read, into a fresh buffer (not zero-filled first: it is all overwritten)."""
        view = memoryview(torch.empty(nbytes, dtype=torch.uint8).numpy())
        fd = self._fd(read.src, read.file)
        pos, got = read.offset + start, 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], pos + got)
            if n == 0:
                path = Path(self.sources[read.src].path) / read.file
                raise BadCheckpointError(f"{path}: file is truncated (wanted bytes up to "
                                         f"{pos + nbytes})")
            got += n
        return view

    def start_read_ahead(self, max_bytes: int, threads: int = 1) -> "ReadAhead":
        """Run scheduled reads on background threads from now on (see :class:`ReadAhead`)."""
        self.ahead = ReadAhead(self, max_bytes, threads)
        return self.ahead

    def _time(self, name: str) -> Any:
        return self.phases.time(name) if self.phases is not None else contextlib.nullcontext()

    def _check_hash(self, read: Read, start: int, buf: bytearray, tensor: str | None) -> None:
        """Feed the tensor's running hash; compare it once the last byte is in."""
        if read.content_hash is None:
            return
        with self._hash_lock:
            self._feed_hash(read, start, buf, tensor)

    def _feed_hash(self, read: Read, start: int, buf: bytearray, tensor: str | None) -> None:
        key = id(read)
        if start == 0:
            state = (read, hasher_like(read.content_hash), 0)
        else:
            state = self._hashing.pop(key, None)
            if state is None or state[2] != start:  # a partial read: cannot be checked
                return
        h = state[1]
        h.update(buf)
        pos = start + len(buf)
        if pos < read.nbytes:
            self._hashing[key] = (read, h, pos)
            return
        self._hashing.pop(key, None)
        if h.hexdigest() != read.content_hash:
            src = self.sources[read.src]
            what = f"tensor {tensor!r}" if tensor else f"the tensor at byte {read.offset}"
            raise StaleModelError(
                f"model {src.key!r}: {what} in {Path(src.path) / read.file} is not what was "
                f"registered (the file changed); run `mergepipe register {src.path}` again")
        self.checked_bytes += read.nbytes

    def rows_over(self, read: Read, shape: tuple[int, ...], a: int, b: int,
                  fill: torch.Tensor, tensor: str, native: bool = False) -> torch.Tensor:
        """Rows [a, b), reading only the selected row ranges; the rest come from ``fill``.

        Used in budget mode: unselected expert blocks count as zero delta, so
        they take the base's values and cost no I/O; a block with no selected row
        is ``fill`` itself (methods must not modify their inputs).
        """
        if read.rows is None or any(lo <= a and b <= hi for lo, hi in read.rows):
            return self.rows(read, shape, a, b, tensor, fill.device, native)
        if not any(lo < b and a < hi for lo, hi in read.rows):
            return fill   # nothing selected here: ``fill`` itself, which methods may skip
        out = fill.clone()
        for ra, rb in read.rows:
            lo, hi = max(a, ra), min(b, rb)
            if lo < hi:
                out[lo - a:hi - a] = self.rows(read, shape, lo, hi, tensor, fill.device)
        return out

    def prefetch(self, read: Read, shape: tuple[int, ...]) -> None:
        """Ask the kernel to start reading what ``read`` will need (no bytes counted:
        they are counted when :meth:`raw` takes them)."""
        if read.alias_base or read.rows == []:
            return
        fd = self._fd(read.src, read.file)
        row_bytes = row_split(shape, read.nbytes)[1]
        ranges = [(0, read.nbytes)] if read.rows is None else \
            [(a * row_bytes, (b - a) * row_bytes) for a, b in read.rows]
        for start, length in ranges:
            if length:
                os.posix_fadvise(fd, read.offset + start, length, os.POSIX_FADV_WILLNEED)

    def _to_float(self, buf: bytearray, read: Read, shape: tuple[int, ...],
                  tensor: str, native: bool = False) -> torch.Tensor:
        if not buf:
            return torch.zeros(shape, dtype=torch.float32)
        t = torch.frombuffer(buf, dtype=torch_dtype(read.dtype)).reshape(shape)
        if not (native and t.is_floating_point()):
            t = t.to(dtype=torch.float32)
        self._check_finite(t, read, tensor)
        return t

    def _check_finite(self, t: torch.Tensor, read: Read, tensor: str) -> None:
        # any NaN/Inf makes the sum non-finite; only then pay for the elementwise check
        # (which also tells a true NaN/Inf from a sum that merely overflowed)
        if not self.allow_nonfinite and not bool(torch.isfinite(t.sum())) \
                and not bool(torch.isfinite(t).all()):
            name = self.sources[read.src].key
            raise MergePipeError(f"model {name!r} tensor {tensor!r} contains NaN or Inf "
                                 f"(pass --allow-nonfinite to merge anyway)")

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _form(shape: tuple[int, ...] | None, native: bool) -> str:
    """What a read hands over: raw bytes, float32 rows, or rows in the file's dtype."""
    return "bytes" if shape is None else "native" if native else "f32"


class _Slot:
    __slots__ = ("key", "read", "start", "nbytes", "tensor", "shape", "native", "state",
                 "result")
    QUEUED, READING, READ, DONE = 0, 1, 2, 3

    def __init__(self, key: tuple, read: Read, start: int, nbytes: int, tensor: str | None,
                 shape: tuple[int, ...] | None, native: bool):
        self.key, self.read, self.start, self.nbytes = key, read, start, nbytes
        self.tensor, self.shape, self.native = tensor, shape, native
        self.state = _Slot.QUEUED
        self.result: Any = None   # the bytes once READ; the handed-over value once DONE


class ReadAhead:
    """Reads, checks and decodes the ranges the merge will ask for next, on background threads.

    ``os.preadv``, blake3 and torch's conversions all release the GIL, so the
    disk and these threads work while the merge thread does the math on what
    came before: a cold merge then costs about the largest of its disk time,
    these threads' time and the math, not their sum. ``threads`` threads keep
    that many reads in flight; one more checks the hashes and decodes, range by
    range in schedule order, as a tensor's running hash needs. The engine
    :meth:`schedule`s the exact ranges it will read, in its order; ``take``
    hands each over (a range never scheduled is read by the caller). At most
    ``max_bytes`` of read ranges wait to be taken. Bytes count as read when
    taken, so the budget's counts do not change; ranges read and then skipped
    over (never taken) are counted as ``unused_bytes``.
    """

    def __init__(self, reader: BlockReader, max_bytes: int, threads: int = 1):
        self._reader = reader
        self.max_bytes = max_bytes
        self._cv = threading.Condition()
        self._slots: deque[_Slot] = deque()     # scheduled, not yet taken: DONE ones first
        self._queued: deque[_Slot] = deque()    # not yet picked by a read thread (a suffix)
        self._done = 0                          # DONE slots at the head of _slots
        self._held = 0                          # bytes read (or being read) and not yet taken
        self._pending = 0                       # bytes scheduled and not yet taken
        self._closed = False
        self.unused_bytes = 0
        self._threads = [threading.Thread(target=self._read_loop, daemon=True,
                                          name=f"mergepipe-read-{i}") for i in range(threads)]
        self._threads.append(threading.Thread(target=self._finish_loop, daemon=True,
                                              name="mergepipe-read-check"))
        for t in self._threads:
            t.start()

    @staticmethod
    def _key(read: Read, start: int, nbytes: int, form: str) -> tuple:
        return (read.src, read.file, read.offset + start, nbytes, form)

    def schedule(self, ranges: list[tuple]) -> None:
        """Append (read, start, nbytes, tensor, shape, native) ranges in the order they
        will be taken; ``shape`` None hands over the raw bytes, else rows of that shape
        (float32, or the file's float dtype when ``native``)."""
        with self._cv:
            for read, start, nbytes, tensor, shape, native in ranges:
                key = self._key(read, start, nbytes, _form(shape, native))
                slot = _Slot(key, read, start, nbytes, tensor, shape, native)
                self._slots.append(slot)
                self._queued.append(slot)
                self._pending += nbytes
            self._cv.notify_all()

    def pending_bytes(self) -> int:
        """Bytes scheduled and not yet taken (read or not)."""
        with self._cv:
            return self._pending

    def take(self, read: Read, start: int, nbytes: int, form: str) -> Any:
        """The scheduled range's result (waiting for it if needed), or None.

        Ranges before it in the schedule were skipped by the merge: dropped if
        not yet read, else waited for (their hash state must stay in order).
        """
        key = self._key(read, start, nbytes, form)
        with self._cv:
            pos = next((i for i, slot in enumerate(self._slots) if slot.key == key), None)
            if pos is None:
                return None
            for n in range(pos + 1):
                slot = self._slots[0]
                if n < pos and slot.state == _Slot.QUEUED:
                    self._slots.popleft()       # skipped before anyone read it
                    self._queued.popleft()
                    self._pending -= slot.nbytes
                    continue
                while slot.state != _Slot.DONE:
                    self._cv.wait()
                self._slots.popleft()
                self._done -= 1
                self._pending -= slot.nbytes
                if not isinstance(slot.result, BaseException):
                    self._held -= slot.nbytes
                    if n < pos:                 # scheduled, read, then skipped over
                        self.unused_bytes += slot.nbytes
            self._cv.notify_all()
            if isinstance(slot.result, BaseException):
                raise slot.result
            return slot.result

    def _read_loop(self) -> None:
        """Pick the first queued range (while under ``max_bytes``) and pread it."""
        while True:
            with self._cv:
                while not self._closed and (slot := self._next_queued()) is None:
                    self._cv.wait()
                if self._closed:
                    return
                slot.state = _Slot.READING
                self._held += slot.nbytes
            try:
                with self._reader._time("read_ahead"):
                    result: Any = self._reader.pread(slot.read, slot.start, slot.nbytes)
            except BaseException as exc:   # raised to whoever takes this range
                result = exc
            with self._cv:
                slot.result, slot.state = result, _Slot.READ
                self._cv.notify_all()

    def _next_queued(self) -> _Slot | None:
        if self._held >= self.max_bytes or not self._queued:
            return None
        return self._queued.popleft()

    def _finish_loop(self) -> None:
        """Check and decode read ranges in schedule order."""
        while True:
            with self._cv:
                while not self._closed and (slot := self._next_read()) is None:
                    self._cv.wait()
                if self._closed:
                    return
            result = slot.result
            if not isinstance(result, BaseException):
                try:
                    result = self._reader.finish(slot.read, slot.start, result, slot.tensor,
                                                 slot.shape, slot.native)
                except BaseException as exc:
                    result = exc
            with self._cv:
                slot.result, slot.state = result, _Slot.DONE
                self._done += 1
                if isinstance(result, BaseException):
                    self._held -= slot.nbytes
                self._cv.notify_all()

    def _next_read(self) -> _Slot | None:
        """The first range not yet finished, once it is read (None while it is not)."""
        if self._done == len(self._slots):
            return None
        slot = self._slots[self._done]
        return slot if slot.state == _Slot.READ else None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

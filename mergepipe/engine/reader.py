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
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mergepipe.hashing import TensorHasher, hasher_like
from mergepipe.errors import BadCheckpointError, MergePipeError, StaleModelError
from mergepipe.planner.plan import Read, Source
from mergepipe.files import safe_relpath
from mergepipe.safetensors_format import row_split, torch_dtype


class BlockReader:
    """Reads row ranges of tensors from the plan's sources; one fd per file."""

    def __init__(self, sources: list[Source], allow_nonfinite: bool = False):
        self.sources = sources
        self.allow_nonfinite = allow_nonfinite
        self.bytes_read = [0] * len(sources)
        self._fds: dict[tuple[int, str], int] = {}
        self._hashing: dict[int, tuple[Read, TensorHasher, int]] = {}  # id(read) -> state
        self.checked_bytes = 0     # bytes whose tensor hash was compared with the catalog

    def _fd(self, src: int, rel: str) -> int:
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

    def raw(self, read: Read, start: int, nbytes: int, tensor: str | None = None) -> bytearray:
        """Exactly nbytes from the tensor's byte offset ``start``."""
        buf = bytearray(nbytes)
        view = memoryview(buf)
        fd = self._fd(read.src, read.file)
        pos, got = read.offset + start, 0
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], pos + got)
            if n == 0:
                path = Path(self.sources[read.src].path) / read.file
                raise BadCheckpointError(f"{path}: file is truncated (wanted bytes up to "
                                         f"{pos + nbytes})")
            got += n
        self.bytes_read[read.src] += nbytes
        self._check_hash(read, start, buf, tensor)
        return buf

    def _check_hash(self, read: Read, start: int, buf: bytearray, tensor: str | None) -> None:
        """Feed the tensor's running hash; compare it once the last byte is in."""
        if read.content_hash is None:
            return
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

    def rows(self, read: Read, shape: tuple[int, ...], a: int, b: int, tensor: str,
             device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows [a, b) of a tensor as float32 on ``device``."""
        row_bytes = row_split(shape, read.nbytes)[1]
        buf = self.raw(read, a * row_bytes, (b - a) * row_bytes, tensor)
        return self._to_float(buf, read, (b - a, *shape[1:]) if shape else (), tensor, device)

    def rows_over(self, read: Read, shape: tuple[int, ...], a: int, b: int,
                  fill: torch.Tensor, tensor: str) -> torch.Tensor:
        """Rows [a, b), reading only the selected row ranges; the rest come from ``fill``.

        Used in budget mode: unselected expert blocks count as zero delta, so
        they take the base's values and cost no I/O.
        """
        if read.rows is None or any(lo <= a and b <= hi for lo, hi in read.rows):
            return self.rows(read, shape, a, b, tensor, fill.device)
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

    def _to_float(self, buf: bytearray, read: Read, shape: tuple[int, ...], tensor: str,
                  device: torch.device | str) -> torch.Tensor:
        if not buf:
            return torch.zeros(shape, dtype=torch.float32, device=device)
        t = torch.frombuffer(buf, dtype=torch_dtype(read.dtype)).reshape(shape)
        t = t.to(device=device, dtype=torch.float32)
        # any NaN/Inf makes the sum non-finite; only then pay for the elementwise check
        # (which also tells a true NaN/Inf from a sum that merely overflowed)
        if not self.allow_nonfinite and not bool(torch.isfinite(t.sum())) \
                and not bool(torch.isfinite(t).all()):
            name = self.sources[read.src].key
            raise MergePipeError(f"model {name!r} tensor {tensor!r} contains NaN or Inf "
                                 f"(pass --allow-nonfinite to merge anyway)")
        return t

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

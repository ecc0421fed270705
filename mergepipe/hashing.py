"""Tensor content hashes: what registration records and the engine checks and writes.

Every input byte of a merge is hashed to prove the file is the one registered,
so the hash must run near memory speed: blake3 does (several GB/s per core)
where blake2b managed about 0.45 GB/s and cost more than the disk read of a
cold merge. New hashes are blake3-128, written ``b3:`` + 32 hex digits.
Catalogs and manifests from before hold blake2b-128 (32 bare hex digits);
:func:`tensor_hasher` picks the kind of a stored hash, so they still verify.
"""
from __future__ import annotations

import hashlib
from typing import Protocol

import blake3

BLAKE3 = "blake3-128"
BLAKE2B = "blake2b-128"      # the kind stored before blake3
_PREFIX = "b3:"


class TensorHasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview) -> object: ...
    def hexdigest(self) -> str: ...


class _Blake3:
    """blake3 truncated to 128 bits, tagged so its kind is never guessed."""

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)   # releases the GIL on large buffers

    def hexdigest(self) -> str:
        return _PREFIX + self._h.hexdigest(length=16)


def kind_of(stored: str) -> str:
    """The kind of a stored tensor hash."""
    return BLAKE3 if stored.startswith(_PREFIX) else BLAKE2B


def tensor_hasher(kind: str = BLAKE3) -> TensorHasher:
    """A fresh hasher of ``kind`` (:data:`BLAKE3` for everything new)."""
    if kind == BLAKE3:
        return _Blake3()
    if kind == BLAKE2B:
        return hashlib.blake2b(digest_size=16)
    raise ValueError(f"unknown tensor hash kind {kind!r}")


def hasher_like(stored: str) -> TensorHasher:
    """A fresh hasher of the same kind as the stored hash it will be compared with."""
    return tensor_hasher(kind_of(stored))

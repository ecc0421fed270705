"""Reductions whose bits do not depend on torch's thread count.

torch splits a large full reduction (a sum or norm to one number) across
threads and adds the partial results, so the last bits of an L1 norm or a dot
product change with ``torch.set_num_threads``. Below torch's parallel grain
the reduction runs on one thread; above it we reduce fixed-size chunks (each
chunk is one output of a multi-output reduction, computed by one thread) and
then reduce the partial results the same way. Small tensors therefore get
exactly torch's (and mergekit's) result, large ones the same bytes anywhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GRAIN = 32768   # torch's parallel grain size: smaller reductions run serially
CHUNK = 16384


def _chunks(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % CHUNK
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, CHUNK)


def sum_last(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension."""
    if x.shape[-1] < GRAIN:
        return x.sum(dim=-1)
    return sum_last(_chunks(x).sum(dim=-1))


def norm_last(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last dimension (a norm of chunk norms when large)."""
    if x.shape[-1] < GRAIN:
        return torch.linalg.vector_norm(x, dim=-1)
    return norm_last(torch.linalg.vector_norm(_chunks(x), dim=-1))


def total(x: torch.Tensor) -> torch.Tensor:
    """Sum of every element."""
    return sum_last(x.reshape(-1))


class StreamTotal:
    """:func:`total` of a tensor that arrives as consecutive flat pieces.

    Gives the same bits as ``total`` of the whole tensor: the same 16384-element
    chunks are summed (a piece's tail waits in a buffer for the next piece),
    then the chunk sums are reduced as ``total`` reduces them. Memory is one
    chunk plus one float per chunk, allocated up front (many small tensors
    kept between large temporaries would fragment the heap); a tensor below
    the grain is kept whole, as ``total`` sums it in one call.
    """

    def __init__(self, numel: int):
        self.numel = numel
        small = numel < GRAIN
        self.carry = torch.empty(numel if small else CHUNK)
        self.held = 0
        self.parts = torch.empty(0 if small else -(-numel // CHUNK))
        self.filled = 0

    def add(self, piece: torch.Tensor) -> None:
        x = piece.reshape(-1)
        if self.numel < GRAIN:
            self.carry[self.held:self.held + x.numel()] = x
            self.held += x.numel()
            return
        if self.held:  # complete the waiting chunk first
            take = min(CHUNK - self.held, x.numel())
            self.carry[self.held:self.held + take] = x[:take]
            self.held += take
            x = x[take:]
            if self.held < CHUNK:
                return
            self._sum(self.carry.reshape(1, CHUNK))
            self.held = 0
        whole = x.numel() // CHUNK * CHUNK
        if whole:
            self._sum(x[:whole].reshape(-1, CHUNK))
        rest = x.numel() - whole
        self.carry[:rest] = x[whole:]
        self.held = rest

    def _sum(self, chunks: torch.Tensor) -> None:
        n = chunks.shape[0]
        torch.sum(chunks, dim=-1, out=self.parts[self.filled:self.filled + n])
        self.filled += n

    def result(self) -> torch.Tensor:
        if self.numel < GRAIN:
            return self.carry[:self.held].sum()
        if self.held:
            self.carry[self.held:] = 0
            self._sum(self.carry.reshape(1, CHUNK))
            self.held = 0
        return sum_last(self.parts[:self.filled])

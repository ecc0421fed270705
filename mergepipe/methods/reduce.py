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

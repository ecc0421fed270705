"""Exact rank selection over a tensor that is only ever seen one block at a time.

TIES and breadcrumbs keep the entries whose magnitude rank falls in a window
(the top ``k``; or ranks ``n_bot`` to ``n_bot + target`` from the bottom).
Sorting the whole tensor needs it in memory; here two passes of 16-bit
histograms over the float32 bit patterns (which order like the values when
non-negative) find the boundary values exactly, and a third pass applies the
window, so memory is a few histograms whatever the tensor size.

Ties at a boundary value are broken by flat index — the order of a *stable*
sort: among equal magnitudes the earlier entry ranks first. mergekit uses
torch's unstable ``argsort``, whose order among equal values is an accident of
the sort algorithm, so outputs can differ only on entries whose magnitude
equals a boundary value (never when magnitudes are distinct).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HI_BINS = 1 << 15   # bits 16..30 (the sign bit of a magnitude is 0)
LO_BINS = 1 << 16   # bits 0..15


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns, flat: ordered exactly as the magnitudes are."""
    return x.abs().reshape(-1).view(torch.int32)


@dataclass
class Boundary:
    """The value at one rank: its bit pattern and how many entries lie below / equal it."""

    bits: int
    less: int
    equal: int


class RankSelect:
    """Values at given ascending ranks of a multiset of magnitudes, in two passes.

    Feed every block to :meth:`observe` in pass 0, call :meth:`end_pass`, feed
    them again in pass 1, call :meth:`end_pass`; then :attr:`boundaries`
    holds one :class:`Boundary` per requested rank.
    """

    def __init__(self, ranks: list[int]):
        self.ranks = ranks
        self.hist = torch.zeros(HI_BINS, dtype=torch.int64)
        self.bins: dict[int, int] = {}                 # high bin -> count below it
        self.low: dict[int, torch.Tensor] = {}
        self.boundaries: list[Boundary] = []

    def observe(self, pass_no: int, bits: torch.Tensor) -> None:
        high = bits >> 16
        if pass_no == 0:
            self.hist += torch.bincount(high, minlength=HI_BINS)
            return
        for b in self.bins:
            sel = bits[high == b] & 0xFFFF
            self.low[b] += torch.bincount(sel, minlength=LO_BINS)

    def end_pass(self, pass_no: int) -> None:
        if pass_no == 0:
            cum = torch.cumsum(self.hist, 0)
            for r in self.ranks:
                b = int(torch.searchsorted(cum, torch.tensor([r]), right=True)[0])
                self.bins[b] = int(cum[b] - self.hist[b])
                self.low[b] = torch.zeros(LO_BINS, dtype=torch.int64)
            return
        for r in self.ranks:
            b = next(b for b, below in self.bins.items()
                     if below <= r < below + int(self.hist[b]))
            low = self.low[b]
            cum = torch.cumsum(low, 0)
            lo = int(torch.searchsorted(cum, torch.tensor([r - self.bins[b]]), right=True)[0])
            self.boundaries.append(Boundary((b << 16) | lo, self.bins[b] + int(cum[lo] - low[lo]),
                                            int(low[lo])))


class RankWindow:
    """Marks, block by block in flat order, the entries whose stable rank is in [r0, r1).

    Ranks count from the smallest magnitude (``descending=False``) or the
    largest; equal magnitudes rank by flat index. ``first``/``last`` are the
    boundaries at ranks r0 and r1 − 1 in ascending terms (as :class:`RankSelect`
    finds them); ``numel`` is the tensor's size.
    """

    def __init__(self, r0: int, r1: int, first: Boundary, last: Boundary, numel: int,
                 descending: bool):
        self.r0, self.r1, self.descending = r0, r1, descending
        lo, hi = (last, first) if descending else (first, last)   # by value
        self.lo_bits, self.hi_bits = lo.bits, hi.bits
        # for each boundary value: the window on the tie index t among its equals
        self.ties: dict[int, tuple[int, int]] = {}
        for bnd in (first, last):
            start = numel - bnd.less - bnd.equal if descending else bnd.less
            self.ties[bnd.bits] = (r0 - start, r1 - start)
        self.seen = {bits: 0 for bits in self.ties}

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask of one flat block; blocks must come in order."""
        keep = (bits > self.lo_bits) & (bits < self.hi_bits)
        for value, (t0, t1) in self.ties.items():
            eq = bits == value
            n = int(eq.sum())
            if not n:
                continue
            t = torch.cumsum(eq, 0, dtype=torch.int64) + (self.seen[value] - 1)
            keep |= eq & (t >= t0) & (t < t1)
            self.seen[value] += n
        return keep


def window_ranks(numel: int, r0: int, r1: int, descending: bool) -> list[int]:
    """The ascending ranks whose values bound a window of stable ranks [r0, r1)."""
    if descending:
        return [numel - 1 - r0, numel - r1]
    return [r0, r1 - 1]

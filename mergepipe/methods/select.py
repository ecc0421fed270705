"""Exact rank selection over a tensor that is only ever seen one block at a time.

TIES and breadcrumbs keep the entries whose magnitude rank falls in a window
(the top ``k``; or ranks ``n_bot`` to ``n_bot + target`` from the bottom).
Sorting the whole tensor needs it in memory; here two passes of 16-bit
histograms over the float32 bit patterns (which order like the values when
non-negative) find the boundary values exactly, and the merge pass applies the
window, so memory is a few histograms whatever the tensor size. A window that
reaches the largest (or smallest) magnitude needs no boundary at that end, so
TIES finds one value, breadcrumbs two.

Ties at a boundary value are broken by flat index — the order of a *stable*
sort: among equal magnitudes the earlier entry ranks first. mergekit uses
torch's unstable ``argsort``, whose order among equal values is an accident of
the sort algorithm, so outputs can differ only on entries whose magnitude
equals a boundary value (never when magnitudes are distinct).

The two statistics passes run as compiled loops (:mod:`.kernels`) that take
``|x − base|`` without writing a delta. The merge pass's per-block work is
integer arithmetic on the bit patterns (a comparison is a subtraction and a
sign shift, a mask is a bitwise and): torch's boolean tensors cost several
times more per element on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

HI_BINS = 1 << 15   # bits 16..30 (the sign bit of a magnitude is 0)
LO_BINS = 1 << 16   # bits 0..15
LISTED_ENTRIES = 1 << 20   # a boundary bin up to this size is listed block by block


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| as int32 bit patterns, flat: ordered exactly as the magnitudes are."""
    return x.abs().reshape(-1).view(torch.int32)


def at_least(bits: torch.Tensor, value: int) -> torch.Tensor:
    """int32 mask of ``bits >= value``: all ones where true, 0 where false.

    Bit patterns of magnitudes are non-negative, so ``value - 1 - bits`` cannot
    overflow and its sign says the answer.
    """
    return torch.sub(value - 1, bits).bitwise_right_shift_(31)


def at_most(bits: torch.Tensor, value: int) -> torch.Tensor:
    """int32 mask of ``bits <= value`` (see :func:`at_least`)."""
    return torch.sub(bits, value + 1).bitwise_right_shift_(31)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) with the entries outside an int32 mask set to +0.0, in place."""
    x.view(torch.int32).reshape(-1).bitwise_and_(mask)
    return x


@dataclass
class Boundary:
    """The value at one rank: its bit pattern and how many entries lie below / equal it."""

    bits: int
    less: int
    equal: int
    per_block: list[int | None] | None = None   # entries equal to it per block (None: unknown)


class RankSelect:
    """Values at given ascending ranks of a multiset of magnitudes, in two passes.

    Feed every block to :meth:`observe` in pass 0, call :meth:`end_pass`, feed
    them again in pass 1, call :meth:`end_pass`; then :attr:`boundaries`
    holds one :class:`Boundary` per requested rank, with its count in each
    block (so the merge pass knows which block cuts its ties without counting).
    :meth:`observe_zeros` stands for a block of zeros without computing on it.
    """

    def __init__(self, ranks: list[int] | None):
        # None: the ranks are set before end_pass(0), once pass 0 has counted what
        # they depend on (SCE's rank is a fraction of the nonzero variances)
        self.ranks = ranks
        self.hist = torch.zeros(HI_BINS, dtype=torch.int64)
        self.bins: dict[int, int] = {}                 # high bin -> count below it
        self.low: dict[int, torch.Tensor] = {}
        # per high bin, per block of pass 1: the low values present and their counts
        # (None for a bin of more than LISTED_ENTRIES: the merge pass counts those ties)
        self.blocks: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self.listed: dict[int, bool] = {}   # per high bin: its entries listed per block
        self.boundaries: list[Boundary] = []

    def observe(self, pass_no: int, src: torch.Tensor, base: torch.Tensor | None = None) -> None:
        """One block of magnitudes: ``|src − base|`` in float32, or ``src`` itself as
        int32 bit patterns (:func:`magnitude_bits`) when ``base`` is None."""
        if self.ranks == []:
            return
        # numba (~0.6 s and ~130 MiB to import) loads with the first selection, not per command
        from mergepipe.methods.kernels import high_histogram, low_bits_in_bins, low_histogram
        if pass_no == 0:
            high_histogram(src, base, self.hist)
            return
        listed = [b for b in self.bins if self.listed[b]]
        for b in self.bins:
            if not self.listed[b]:   # a crowded bin: its counts only, no per-block record
                low_histogram(src, base, b, self.low[b])
                self.blocks[b].append(None)
        for b, low in zip(listed, low_bits_in_bins(src, base, listed)):
            present, counts = torch.unique(low, return_counts=True)
            self.low[b].index_add_(0, present, counts)
            self.blocks[b].append((present.to(torch.int32), counts.to(torch.int32)))

    def observe_zeros(self, pass_no: int, n: int) -> None:
        if pass_no == 0:
            self.hist[0] += n
            return
        for b in self.bins:
            zeros = torch.tensor([0]), torch.tensor([n if b == 0 else 0])
            self.blocks[b].append(zeros)
            self.low[b][0] += zeros[1][0]

    def end_pass(self, pass_no: int) -> None:
        if pass_no == 0:
            cum = torch.cumsum(self.hist, 0)
            for r in self.ranks:
                b = int(torch.searchsorted(cum, torch.tensor([r]), right=True)[0])
                self.bins[b] = int(cum[b] - self.hist[b])
                self.low[b] = torch.zeros(LO_BINS + 8, dtype=torch.int64)   # + spare counters
                self.blocks[b] = []
                self.listed[b] = int(self.hist[b]) <= LISTED_ENTRIES
            return
        for r in self.ranks:
            b = next(b for b, below in self.bins.items()
                     if below <= r < below + int(self.hist[b]))
            low = self.low[b][:LO_BINS]
            cum = torch.cumsum(low, 0)
            lo = int(torch.searchsorted(cum, torch.tensor([r - self.bins[b]]), right=True)[0])
            per_block = [None if rec is None else int(rec[1][rec[0] == lo].sum())
                         for rec in self.blocks[b]]
            self.boundaries.append(Boundary((b << 16) | lo, self.bins[b] + int(cum[lo] - low[lo]),
                                            int(low[lo]), per_block))
        self.blocks.clear()


@dataclass
class _Cut:
    """Which of the entries equal to a boundary value are kept: tie indices [t0, t1)."""

    bits: int
    t0: int
    t1: int
    equal: int
    per_block: list[int | None] | None = None   # ties in each block, where the statistics know
    seen: int = 0
    block: int = 0

    def next_block(self) -> int | None:
        """This block's tie count when known (and on to the next block), else None."""
        self.block += 1
        if self.per_block is None or self.block > len(self.per_block):
            return None   # counted in the block instead
        return self.per_block[self.block - 1]

    @property
    def kind(self) -> str:
        if self.t0 <= 0 and self.t1 >= self.equal:
            return "all"
        if self.t1 <= 0 or self.t0 >= self.equal:
            return "none"
        return "some"


class RankWindow:
    """Marks, block by block in flat order, the entries whose stable rank is in [r0, r1).

    Ranks count from the smallest magnitude (``descending=False``) or the
    largest; equal magnitudes rank by flat index. ``lo``/``hi`` are the
    boundaries at the lowest and highest kept values (as :class:`RankSelect`
    finds them at the ranks :func:`window_ranks` gives), None where the window
    reaches that end; ``numel`` is the tensor's size.
    """

    def __init__(self, r0: int, r1: int, lo: Boundary | None, hi: Boundary | None, numel: int,
                 descending: bool):
        self.cuts: dict[int, _Cut] = {}
        for bnd in (lo, hi):
            if bnd is not None:
                start = numel - bnd.less - bnd.equal if descending else bnd.less
                self.cuts[bnd.bits] = _Cut(bnd.bits, r0 - start, r1 - start, bnd.equal,
                                           bnd.per_block)
        self.lo, self.hi = (self.cuts[b.bits] if b is not None else None for b in (lo, hi))

    def keep(self, bits: torch.Tensor) -> torch.Tensor | None:
        """int32 keep-mask (all ones / 0) of one flat block, or None for "keep all".

        Blocks must come in order: the ties at a boundary are counted as they pass.
        """
        lo, hi = self.lo, self.hi
        if lo is not None and lo is hi:   # one value: only (some of) its ties are kept
            n = lo.next_block()
            if n == 0:
                return torch.zeros_like(bits)
            ge, le = at_least(bits, lo.bits), at_most(bits, lo.bits)
            return self._ties(lo, ge.bitwise_and_(le), None, n=n)
        mask = None
        for cut, is_lo in ((lo, True), (hi, False)):
            if cut is None:
                continue
            side = self._side(bits, cut, is_lo)
            mask = side if mask is None else mask.bitwise_and_(side)
        return mask

    def lower_cut(self) -> tuple[int, int, int] | None:
        """For a window bounded below only (TIES' top k), this block's selection as
        ``(value, first, last)``: keep the bit patterns above ``value`` and, of those
        equal to it, the ones whose tie index within the block is in [first, last).
        None for other windows. Call :meth:`passed` with the block's tie count after."""
        lo, hi = self.lo, self.hi
        if hi is not None:
            return None
        if lo is None:
            return -1, 0, 0   # the whole tensor is kept
        return lo.bits, lo.t0 - lo.seen, lo.t1 - lo.seen

    def passed(self, ties: int) -> None:
        """A block went by (after :meth:`lower_cut`) holding ``ties`` entries equal to
        the lower boundary."""
        if self.lo is not None:
            self.lo.block += 1
            self.lo.seen += ties

    @staticmethod
    def _bound(bits: torch.Tensor, value: int, is_lo: bool) -> torch.Tensor:
        return at_least(bits, value) if is_lo else at_most(bits, value)

    def _side(self, bits: torch.Tensor, cut: _Cut, is_lo: bool) -> torch.Tensor:
        """Entries on the kept side of one boundary, with its kept ties."""
        step = 1 if is_lo else -1
        n = cut.next_block()
        kind = cut.kind
        if kind == "some" and n is not None:   # known count: most blocks keep all or none
            first = cut.seen
            if not n or cut.t1 <= first or first + n <= cut.t0:
                kind = "none"
            elif cut.t0 <= first and first + n <= cut.t1:
                kind = "all"
            if kind != "some":
                cut.seen += n
        if kind != "some":
            return self._bound(bits, cut.bits if kind == "all" else cut.bits + step, is_lo)
        inclusive = self._bound(bits, cut.bits, is_lo)
        strict = self._bound(bits, cut.bits + step, is_lo)
        return self._ties(cut, inclusive.bitwise_xor(strict), strict, inclusive, n)

    @staticmethod
    def _ties(cut: _Cut, eq: torch.Tensor, strict: torch.Tensor | None,
              inclusive: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
        """``strict`` plus the ties (``eq``: all ones where equal) whose index is in the cut."""
        n = -int(eq.sum()) if n is None else n
        first, cut.seen = cut.seen, cut.seen + n
        if n and cut.t0 <= first and first + n <= cut.t1:      # every tie here is kept
            return inclusive if inclusive is not None else eq
        if not n or cut.t1 <= first or first + n <= cut.t0:    # none is
            return strict if strict is not None else torch.zeros_like(eq)
        t = torch.cumsum(eq, 0, dtype=torch.int64).neg_().add_(first - 1)   # tie index
        part = eq.bitwise_and_(((t >= cut.t0) & (t < cut.t1)).to(torch.int32).neg_())
        return part if strict is None else part.bitwise_or_(strict)

    def skip_zeros(self, n: int) -> None:
        """A block of ``n`` zeros went by without :meth:`keep` (kept or not, zeros add nothing)."""
        for cut in self.cuts.values():
            ties = cut.next_block()
            if cut.bits == 0:
                cut.seen += n if ties is None else ties

    def rewind(self) -> None:
        """Start again from the first block (one more pass over the tensor)."""
        for cut in self.cuts.values():
            cut.seen = cut.block = 0

    def mask(self, bits: torch.Tensor) -> torch.Tensor:
        """Boolean keep-mask of one flat block; blocks must come in order."""
        keep = self.keep(bits)
        return torch.ones_like(bits, dtype=torch.bool) if keep is None else keep.bool()


def found_window(select: RankSelect, ranks: tuple[int | None, int | None], r0: int, r1: int,
                 numel: int, descending: bool) -> RankWindow:
    """The window of stable ranks [r0, r1) once ``select`` has found the values at
    ``ranks`` (as :func:`window_ranks` gave them; None ends need no boundary)."""
    found = iter(select.boundaries)
    lo, hi = (None if r is None else next(found) for r in ranks)
    return RankWindow(r0, r1, lo, hi, numel, descending)


def window_ranks(numel: int, r0: int, r1: int, descending: bool) -> tuple[int | None, int | None]:
    """The ascending ranks of the lowest and highest kept values of the window of stable
    ranks [r0, r1); None where the window reaches the smallest or largest value (ties there
    are cut, if at all, at the other end's value)."""
    lo, hi = (numel - r1, numel - 1 - r0) if descending else (r0, r1 - 1)
    return (None if lo == 0 else lo), (None if hi == numel - 1 else hi)

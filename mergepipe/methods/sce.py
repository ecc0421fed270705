"""SCE: select, calculate, erase — task vectors weighted by their own energy.

Optionally keep only the ``select_topk`` fraction of entries where the experts'
task vectors vary most (variance across experts); weight each expert by its
mean squared task vector; erase entries disagreeing with the majority sign;
average what is left.

The selection and the weights are whole-tensor facts, gathered in statistics
passes over row blocks (:class:`SceStream`): pass 0 counts the nonzero
variances and histograms them, pass 1 refines the histogram to the exact
variance at the cut (:mod:`.select`), the last pass sums each expert's
squared selected task vector. The selection is kept per block as a bit mask
(an eighth of a byte per entry), so later passes need no variances: pass 1
already notes which entries lie above the cut's histogram bin and the low bits
of those inside it, enough to place each entry against the cut once it is known.
Each block's variances and sign election are per entry, so a block computes
exactly what the whole tensor would there.
The whole-tensor function is the same stream over one block.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from mergepipe.methods.base import MergeMethod, TensorContext, each, register, whole_tensor
from mergepipe.methods.reduce import StreamTotal
from mergepipe.methods.select import (RankSelect, RankWindow, found_window, magnitude_bits,
                                      window_ranks)


VAR_STEP = 1 << 14   # columns per step (variance, election): cache-sized, spread over the cores
# pass 1 keeps the low bits of the variances in the cut's bin (2 bytes each) up to this
# much; a bin fuller than that (variances tied in bulk) has them recomputed instead
BIN_NOTES_BYTES = 64 << 20


def variance(tvs: torch.Tensor) -> torch.Tensor:
    """``torch.var(tvs, dim=0, unbiased=False)``, bit for bit, several times faster.

    torch reduces across the inputs one entry at a time, with Welford's update
    in float64 (~200 ns per entry at K = 8 here); the same updates, in the
    same order and precision, give the same numbers
    (``tests/test_streamed_sparsify.py`` checks), as a compiled loop over
    columns (:func:`.kernels.variance`) or, for other tensors, as torch vector
    operations on steps of columns; the steps spread over the cores.
    """
    n_inputs = tvs.shape[0]
    flat = tvs.reshape(n_inputs, -1)
    out = torch.empty(flat.shape[1], dtype=tvs.dtype, device=tvs.device)

    from mergepipe.methods import kernels

    def step(a: int) -> None:
        if kernels.variance(flat, slice(a, a + VAR_STEP), out):
            return
        x = flat[:, a:a + VAR_STEP].double()
        mean, m2 = torch.zeros_like(x[0]), torch.zeros_like(x[0])
        d, e = torch.empty_like(mean), torch.empty_like(mean)
        for k in range(n_inputs):
            torch.sub(x[k], mean, out=d)              # delta = x - mean
            mean.add_(torch.div(d, k + 1, out=e))     # mean += delta / n
            torch.sub(x[k], mean, out=e)              # x - new mean
            m2.add_(e.mul_(d))                        # m2 += delta * (x - new mean)
        out[a:a + VAR_STEP] = m2.div_(n_inputs)       # rounded to float32 once
    each(step, range(0, flat.shape[1], VAR_STEP))
    return out.reshape(tvs.shape[1:])


def _energy_weights(means: torch.Tensor) -> torch.Tensor:
    """Each expert's share of the summed mean squares (equal shares when all vanish)."""
    weight_sum = torch.sum(means).item()
    if abs(weight_sum) < 1e-6:
        return torch.ones_like(means) / means.shape[0]
    return means / weight_sum


class SceStream:
    """One tensor's SCE merge: statistics passes over row blocks, then the merge pass.

    Ties among the variances at the cut are kept in flat-index order (as a
    stable sort ranks them); mergekit's ``topk`` picks among them in an
    order of its own, so outputs can differ only where variances tie at the cut.
    """

    def __init__(self, ctx: TensorContext, params: dict[str, Any], n_inputs: int):
        self.numel = math.prod(ctx.shape)
        self.n_inputs = n_inputs
        self.topk = float(params["select_topk"])
        self.selecting = 0 < self.topk < 1
        self.nonzero = 0
        self.cut = 0                          # how many entries the selection keeps
        self.ranks: tuple[int | None, int | None] = (None, None)
        self.select = RankSelect(None) if self.selecting else None
        self.window: RankWindow | None = None
        self.empty = self.topk <= 0          # nothing selected: every task vector is erased
        self.energy = [StreamTotal(self.numel) for _ in range(n_inputs)]
        self.weights: torch.Tensor | None = None
        self.passes = 3 if self.selecting else 1
        # each block's selection, packed (None: the block keeps every entry), in block order
        self.masks: list[np.ndarray | None] = []
        self.replayed = 0
        self.cut_bin: int | None = None     # pass 1 notes entries against this bin
        self.notes: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def wanted(self, pass_no: int) -> list[bool]:
        return [True] * self.n_inputs

    @staticmethod
    def _task_vectors(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        tvs = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
        for k, t in enumerate(tensors):
            torch.sub(t, base, out=tvs[k])
        return tvs

    def _selected(self, tvs: torch.Tensor, replay: bool = False) -> torch.Tensor:
        """The task vectors with the unselected entries zeroed (in place), as mergekit's
        float mask does it (a negative entry becomes -0.0).

        ``replay`` takes each block's kept selection back in block order;
        otherwise it is computed from the variances and kept."""
        if self.empty or (self.selecting and self.window is None):   # nothing is selected
            return tvs.mul_(torch.zeros_like(tvs[0]).unsqueeze(0))
        if not self.selecting or not self.window.cuts:   # every entry is selected
            return tvs
        numel = tvs[0].numel()
        if replay:
            packed = self.masks[self.replayed]
            self.replayed += 1
            if packed is None:   # the window held every entry of this block
                return tvs
            if packed.size != (numel + 7) // 8:
                raise RuntimeError("an SCE pass saw other blocks than its statistics passes")
            keep = torch.from_numpy(np.unpackbits(packed, count=numel).view(np.bool_))
        else:
            keep = self._keep(self.window.keep(magnitude_bits(variance(tvs))))
            if keep is None:
                return tvs
        return tvs.mul_(keep.to(tvs.device, tvs.dtype).reshape(tvs.shape[1:]).unsqueeze(0))

    def _keep(self, kept: torch.Tensor | None) -> torch.Tensor | None:
        """A block's int32 keep-mask as a boolean one, packed into :attr:`masks`."""
        if kept is None:
            self.masks.append(None)
            return None
        keep = kept.ne(0)
        self.masks.append(np.packbits(keep.cpu().numpy()))
        return keep

    def _note(self, bits: torch.Tensor) -> None:
        """Pass 1: which entries lie above the cut's bin, and the low bits of those in it."""
        high = bits >> 16
        above, inside = high > self.cut_bin, high == self.cut_bin
        self.notes.append((bits.numel(), np.packbits(above.cpu().numpy()),
                           np.packbits(inside.cpu().numpy()),
                           (bits[inside] & 0xFFFF).cpu().numpy().astype(np.uint16)))

    def _masks_from_notes(self) -> None:
        """Each block's selection from its pass-1 notes, now that the cut is known.

        Stand-in bit patterns order exactly as the variances do against the cut
        (above its bin: a pattern above the bin; below: 0; inside: the real one),
        so the window, fed the blocks in order, keeps what it would have kept."""
        b = self.cut_bin
        for n, above, inside, low in self.notes:
            stand_in = torch.zeros(n, dtype=torch.int32)
            stand_in[torch.from_numpy(np.unpackbits(above, count=n).view(np.bool_))] = (b + 1) << 16
            stand_in[torch.from_numpy(np.unpackbits(inside, count=n).view(np.bool_))] = \
                torch.from_numpy(low.astype(np.int32)) | (b << 16)
            self._keep(self.window.keep(stand_in))
        self.notes.clear()

    def observe(self, pass_no: int, base: torch.Tensor,
                tensors: list[torch.Tensor | None]) -> None:
        tvs = self._task_vectors(base, tensors)   # every input is wanted in every pass
        if pass_no < self.passes - 1:             # the variance cut
            var = variance(tvs)
            bits = magnitude_bits(var)
            if pass_no == 0:
                self.nonzero += int(torch.count_nonzero(var))
            elif self.cut_bin is not None:
                self._note(bits)
            self.select.observe(pass_no, bits)
            return
        selected = self._selected(tvs, replay=self.cut_bin is not None)
        for k in range(self.n_inputs):
            self.energy[k].add(selected[k].square())

    def end_pass(self, pass_no: int) -> None:
        if pass_no == self.passes - 1:
            means = torch.stack([e.result() for e in self.energy]) / self.numel
            self.weights = _energy_weights(means)
            self.replayed = 0            # the merge pass takes the selection back again
            return
        if pass_no == 0:
            # mergekit's count: int64 tensor times a float, in float32
            k = int(torch.tensor(self.nonzero) * self.topk)
            self.cut = k
            self.ranks = window_ranks(self.numel, 0, k, True) if k else (None, None)
            self.select.ranks = [r for r in self.ranks if r is not None] if k else []
        self.select.end_pass(pass_no)
        if pass_no == 0 and len(self.select.bins) == 1:
            b = next(iter(self.select.bins))
            if b < 0x7FFF and 2 * int(self.select.hist[b]) <= BIN_NOTES_BYTES:
                self.cut_bin = b
        if pass_no == 1 and self.cut:
            self.window = found_window(self.select, self.ranks, 0, self.cut, self.numel, True)
            if self.cut_bin is not None:
                self._masks_from_notes()

    def merge(self, base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One row block: sign election and the energy-weighted average, per entry,
        in cache-sized column steps over the cores (each column is computed alone)."""
        tvs = self._selected(self._task_vectors(base, tensors), replay=True)
        flat, base_flat = tvs.reshape(tvs.shape[0], -1), base.reshape(-1)
        merged = torch.empty_like(base_flat)
        weights = self.weights.reshape(-1, 1)

        def step(a: int) -> None:
            cols = slice(a, a + VAR_STEP)
            t = flat[:, cols]
            majority = (t.sum(dim=0) >= 0).to(t.dtype) * 2 - 1
            erased = weights * (t.sign() == majority)
            mixed = t.mul_(erased).sum(dim=0)
            torch.add(base_flat[cols], mixed / torch.sum(erased, dim=0).clamp(min=1e-6),
                      out=merged[cols])
        each(step, range(0, base_flat.numel(), VAR_STEP))
        return merged.reshape(base.shape)


def sce(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
        params: dict[str, Any]) -> torch.Tensor:
    """The whole tensor as one block of the stream."""
    assert base is not None
    if not tensors:
        return base
    return whole_tensor(SceStream(dataclasses.replace(ctx, shape=tuple(base.shape)), params,
                                  len(tensors)), base, tensors)


register(MergeMethod(
    name="sce", fn=sce, stream=SceStream,
    global_params={"select_topk": 1.0, "int8_mask": False},
    base="required", scope="tensor", min_models=1, native_inputs=True,
    description="variance-selected, energy-weighted task vectors with sign consensus",
))

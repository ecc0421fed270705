"""Compiled loops for the per-entry work of merges (the task-arithmetic family, SCE).

The statistics passes. Finding a magnitude threshold exactly (:mod:`.select`) visits every entry of
every input twice: once to count the high 16 bits of ``|x − base|`` and once
to pick out the low 16 bits of the entries in the boundary bin. As torch
operations that is five to six passes over memory per entry (subtract,
absolute value, shift, compare, ``bincount``); each loop here does it in one,
with the subtraction fused, so no float32 delta is written for a statistics
pass. Integer counts and IEEE float32 subtraction give the same answer on
every CPU and instruction set, so results are exactly those of the torch
operations they replace (tests compare the two).

The merge pass. Per input, one loop writes the kept, weighted delta
(:func:`kept_delta`, counting the ties at the threshold as it goes) where
torch needs five operations or more; then one loop per
column step elects signs and averages (:func:`consensus_merge`), summing over
the inputs in their order as torch's ``sum(dim=0)`` does in its main loop for
up to :data:`CONSENSUS_MAX_INPUTS` inputs; the torch code runs for more inputs
and for a step's last columns, which torch sums in another order. Plain task
arithmetic needs no delta in memory at all: :func:`weighted_sum_merge` reads
each input once and sums its weighted delta in the same order. SCE's
variance across the inputs (:func:`variance`) is Welford's float64 update, as
torch.var computes it, one column at a time in a vectorised loop.

Sources: bfloat16 inputs (read as their 16-bit patterns) or float32 inputs
against a float32 base; or int32 magnitude bit patterns already computed
(SCE's variances). Anything else is turned into bit patterns by torch first.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload


def _as_float(v):   # noqa: ANN001, ANN202 - numba picks an implementation by type
    """An input entry as float32: bf16 patterns (uint16) widened, float32 as is."""


@overload(_as_float, inline="always")
def _as_float_impl(v):  # noqa: ANN001, ANN202
    if isinstance(v, types.Integer):
        return lambda v: np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    return lambda v: v


def _magnitude(x, base, i):   # noqa: ANN001, ANN202
    """Bit pattern of entry i's magnitude: |x[i] − base[i]|, or x[i] for int32 bits."""


@overload(_magnitude, inline="always")
def _magnitude_impl(x, base, i):  # noqa: ANN001, ANN202
    if x.dtype == types.int32:   # already magnitude bit patterns: base is unused
        return lambda x, base, i: x[i]
    return lambda x, base, i: np.float32(abs(_as_float(x[i]) - base[i])).view(np.int32)


@njit(nogil=True, cache=True)
def _high_hist(x: np.ndarray, base: np.ndarray, hist: np.ndarray) -> None:
    for i in range(x.size):
        hist[_magnitude(x, base, i) >> 16] += 1


@njit(nogil=True, cache=True)
def _in_bin(x: np.ndarray, base: np.ndarray, b: int, out: np.ndarray) -> int:
    n = 0
    for i in range(x.size):
        bits = _magnitude(x, base, i)
        if (bits >> 16) == b:
            out[n] = bits & 0xFFFF
            n += 1
    return n


@njit(nogil=True, cache=True)
def _low_hist(x: np.ndarray, base: np.ndarray, b: int, hist: np.ndarray) -> None:
    for i in range(x.size):
        bits = _magnitude(x, base, i)
        # entries outside the bin land in 8 spare counters (no branch, no chain on one)
        hist[(bits & 0xFFFF) if (bits >> 16) == b else 0x10000 + (i & 7)] += 1


LOW_HIST_BINS = 0x10000 + 8   # the low 16 bits, and the spare counters
_NO_BASE = np.zeros(0, dtype=np.float32)


_scratch = threading.local()   # one output buffer per thread, reused across blocks


def _buffer(n: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(n, dtype=np.int32)
    return buf


def _flat(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view (bfloat16 as its uint16 patterns); copies only if not contiguous."""
    t = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _prepared(src: torch.Tensor, base: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """The loops' arrays: (bf16 patterns or float32, float32 base), or (int32 bits, empty)."""
    if base is None:
        if src.dtype != torch.int32:
            raise TypeError(f"magnitude bit patterns are int32, not {src.dtype}")
        return _flat(src), _NO_BASE
    if base.dtype == torch.float32 and base.device.type == "cpu" \
            and src.device.type == "cpu" and src.dtype in (torch.bfloat16, torch.float32):
        return _flat(src), _flat(base)
    delta = torch.sub(src.to(torch.float32), base.to(torch.float32))
    return _flat(delta.abs_().view(torch.int32).cpu()), _NO_BASE


def high_histogram(src: torch.Tensor, base: torch.Tensor | None, hist: torch.Tensor) -> None:
    """Add to ``hist`` (int64, 2**15 bins) the high 16 bits of every magnitude.

    Magnitudes are ``|src − base|`` in float32, or ``src`` itself (int32 bit
    patterns of non-negative floats) when ``base`` is None.
    """
    _high_hist(*_prepared(src, base), hist.numpy())


def low_bits_in_bins(src: torch.Tensor, base: torch.Tensor | None,
                     bins: list[int]) -> list[torch.Tensor]:
    """For each high bin in ``bins``: the low 16 bits (int64) of the magnitudes in it,
    in flat order. Magnitudes as in :func:`high_histogram`; for bins of few entries."""
    x, b = _prepared(src, base)
    buf = _buffer(x.size)
    return [torch.from_numpy(buf[:_in_bin(x, b, hi, buf)]).long()   # a copy: buf is reused
            for hi in bins]


def low_histogram(src: torch.Tensor, base: torch.Tensor | None, b: int,
                  hist: torch.Tensor) -> None:
    """Add to ``hist`` (int64, :data:`LOW_HIST_BINS`) the low 16 bits of the magnitudes
    in high bin ``b`` (as :func:`high_histogram` takes them). For a bin holding many
    entries (bf16 deltas crowd into few), where listing them would cost more."""
    _low_hist(*_prepared(src, base), b, hist.numpy())


@njit(nogil=True, cache=True)
def _kept(x: np.ndarray, base: np.ndarray, value: int, first: int, last: int,
          weight: np.float32, out: np.ndarray) -> int:
    ties = 0
    if first <= 0 and last >= x.size or last <= 0 or first >= x.size:
        # every tie kept, or none: no running index in the condition, so it vectorises
        least = value if last > 0 and first < x.size else value + 1
        for i in range(x.size):
            d = np.float32(_as_float(x[i]) - base[i])
            bits = np.float32(abs(d)).view(np.int32)
            ties += bits == value
            out[i] = (d if bits >= least else np.float32(0.0)) * weight
        return ties
    for i in range(x.size):
        d = np.float32(_as_float(x[i]) - base[i])
        bits = np.float32(abs(d)).view(np.int32)
        tie = bits == value
        keep = (bits > value) | (tie & (ties >= first) & (ties < last))
        ties += tie
        out[i] = (d if keep else np.float32(0.0)) * weight
    return ties


def kept_delta(x: torch.Tensor, base: torch.Tensor, cut: tuple[int, int, int], weight: float,
               out: torch.Tensor) -> int | None:
    """``out = (x − base) · weight`` on the entries a magnitude cut keeps, +0.0 elsewhere
    (float32, as torch's subtract, mask and multiply give). ``cut`` is ``(value, first,
    last)``: keep bit patterns of ``|x − base|`` above ``value`` and, of those equal to
    it, the ones with tie index (flat order, from 0 in this block) in [first, last).
    Returns how many entries equal ``value``; None, with ``out`` untouched, for inputs
    the loops do not take."""
    if x.dtype not in (torch.bfloat16, torch.float32) or base.dtype != torch.float32 \
            or out.dtype != torch.float32 or x.device.type != "cpu" \
            or not (x.is_contiguous() and base.is_contiguous() and out.is_contiguous()):
        return None
    value, first, last = cut
    return int(_kept(_flat(x), _flat(base), value, first, last, np.float32(weight), _flat(out)))


CONSENSUS_MAX_INPUTS = 16   # torch's sum(dim=0) adds rows in order up to here (tested)
# torch's sum(dim=0) adds rows in order in its main loop, which takes 4 vectors of
# columns at a time (32 columns with AVX2, 64 with AVX-512); a slice's last columns
# go through other loops
TORCH_ROW_ORDER_COLUMNS = 64
_COLUMN_CHUNK = 2048        # columns whose running sums stay in L1


@njit(nogil=True, cache=True)
def _consensus(d: np.ndarray, w: np.ndarray, base: np.ndarray, a: int, b: int,
               normalize: bool, lam: np.float32, out: np.ndarray) -> None:
    # branch-free bodies, so that the column loops vectorise
    k_inputs = d.shape[0]
    total = np.empty(_COLUMN_CHUNK, dtype=np.float32)
    mixed = np.empty(_COLUMN_CHUNK, dtype=np.float32)
    weight = np.empty(_COLUMN_CHUNK, dtype=np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for c0 in range(a, b, _COLUMN_CHUNK):
        m = min(_COLUMN_CHUNK, b - c0)
        total[:m] = zero
        mixed[:m] = zero
        weight[:m] = zero
        for k in range(k_inputs):
            row = d[k, c0:c0 + m]
            for i in range(m):
                total[i] += row[i]
        for k in range(k_inputs):
            wk = w[k]
            row = d[k, c0:c0 + m]
            for i in range(m):
                v = row[i]
                # the majority sign is + where the sum is >= 0; zeros agree with neither
                positive = total[i] >= zero
                agree = np.float32(((v > zero) & positive) | ((v < zero) & ~positive))
                mixed[i] += agree * v
                weight[i] += wk * agree
        for i in range(m):
            x = mixed[i]
            if normalize:   # by the agreeing weights; by 1 where none agrees
                x = x / (weight[i] + np.float32(weight[i] == zero))
            if lam != one:
                x = x * lam
            out[c0 + i] = base[c0 + i] + x


def consensus_merge(deltas: torch.Tensor, weights: torch.Tensor, base: torch.Tensor,
                    columns: slice, normalize: bool, lam: float, out: torch.Tensor) -> int:
    """TIES' sign election and (weight-normalised) sum of the weighted ``deltas``
    [inputs, n], scaled by ``lam`` and added to ``base`` into ``out``, over the
    leading columns of ``columns`` that torch sums row by row; returns how many
    (0 where the torch code must run). torch sums the last ``columns`` % 64 in
    another order (its scalar and single-vector tails), so those are left to it."""
    if deltas.shape[0] > CONSENSUS_MAX_INPUTS or deltas.dtype != torch.float32 \
            or not (deltas.is_contiguous() and base.is_contiguous() and out.is_contiguous()) \
            or deltas.device.type != "cpu":
        return 0
    a, b, _ = columns.indices(deltas.shape[1])
    b = a + (b - a) // TORCH_ROW_ORDER_COLUMNS * TORCH_ROW_ORDER_COLUMNS
    if b > a:
        _consensus(deltas.numpy(), weights.to(torch.float32).reshape(-1).numpy(),
                   _flat(base), a, b, normalize, np.float32(lam), _flat(out))
    return b - a


@njit(nogil=True, cache=True)
def _add_weighted(x: np.ndarray, base: np.ndarray, wk: np.float32, total: np.ndarray) -> None:
    for i in range(x.size):
        total[i] += np.float32(_as_float(x[i]) - base[i]) * wk


@njit(nogil=True, cache=True)
def _weighted_sum(xs, base: np.ndarray, w: np.ndarray, a: int, b: int, lam: np.float32,
                  out: np.ndarray) -> None:
    # xs: a tuple of same-typed inputs; one pass over each, no delta written to memory
    total = np.empty(_COLUMN_CHUNK, dtype=np.float32)
    one = np.float32(1.0)
    for c0 in range(a, b, _COLUMN_CHUNK):
        m = min(_COLUMN_CHUNK, b - c0)
        total[:m] = np.float32(0.0)
        for k in range(len(xs)):   # a call per input: the loop over a tuple item vectorises
            _add_weighted(xs[k][c0:c0 + m], base[c0:c0 + m], w[k], total[:m])
        for i in range(m):
            s = total[i]
            if lam != one:
                s = s * lam
            out[c0 + i] = base[c0 + i] + s


def weighted_sum_merge(inputs: list[torch.Tensor], weights: list[float], base: torch.Tensor,
                       columns: slice, lam: float, out: torch.Tensor) -> int:
    """``base + lam · Σ weight_k · (input_k − base)`` into ``out`` (all flat, float32 math)
    over the leading columns of ``columns`` that torch sums row by row, as task
    arithmetic's torch code computes it (each delta weighted, the deltas summed in
    input order from +0.0); returns how many columns (0 where the torch code must
    run). Inputs are all bfloat16 or all float32, at most :data:`CONSENSUS_MAX_INPUTS`."""
    dtypes = {x.dtype for x in inputs}
    if not inputs or len(inputs) > CONSENSUS_MAX_INPUTS or len(dtypes) != 1 \
            or dtypes.pop() not in (torch.bfloat16, torch.float32) \
            or base.dtype != torch.float32 or out.dtype != torch.float32 \
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in (*inputs, base, out)):
        return 0
    a, b, _ = columns.indices(base.numel())
    b = a + (b - a) // TORCH_ROW_ORDER_COLUMNS * TORCH_ROW_ORDER_COLUMNS
    if b > a:
        _weighted_sum(tuple(_flat(x) for x in inputs), _flat(base),
                      np.asarray(weights, dtype=np.float32), a, b, np.float32(lam), _flat(out))
    return b - a


@njit(nogil=True, cache=True)
def _variance(tvs: np.ndarray, a: int, b: int, out: np.ndarray) -> None:
    k_inputs = tvs.shape[0]
    mean = np.empty(_COLUMN_CHUNK, dtype=np.float64)
    m2 = np.empty(_COLUMN_CHUNK, dtype=np.float64)
    for c0 in range(a, b, _COLUMN_CHUNK):
        m = min(_COLUMN_CHUNK, b - c0)
        mean[:m] = 0.0
        m2[:m] = 0.0
        for k in range(k_inputs):
            row = tvs[k, c0:c0 + m]
            n = np.float64(k + 1)
            for i in range(m):   # Welford's update, as torch.var does it (no fused multiply-add)
                x = np.float64(row[i])
                d = x - mean[i]
                mean[i] += d / n
                m2[i] += (x - mean[i]) * d
        for i in range(m):
            out[c0 + i] = np.float32(m2[i] / k_inputs)


def variance(tvs: torch.Tensor, columns: slice, out: torch.Tensor) -> bool:
    """``torch.var(tvs, dim=0, unbiased=False)`` of [inputs, n] float32 over ``columns``
    into ``out`` (flat, n), bit for bit: Welford's float64 updates in torch's order.
    False, with ``out`` untouched, for tensors the loop does not take."""
    if tvs.dtype != torch.float32 or tvs.dim() != 2 or tvs.device.type != "cpu" \
            or not (tvs.is_contiguous() and out.is_contiguous()):
        return False
    a, b, _ = columns.indices(tvs.shape[1])
    _variance(tvs.numpy(), a, b, _flat(out))
    return True


def warm() -> None:
    """Compile (or load from numba's cache) every loop now, not inside the first merge."""
    x = torch.zeros(4, dtype=torch.bfloat16)
    base = torch.zeros(4)
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for src, b in ((x, base), (base, base), (base.view(torch.int32), None)):
        high_histogram(src, b, hist)
        low_bits_in_bins(src, b, [0])
        low_histogram(src, b, 0, torch.zeros(LOW_HIST_BINS, dtype=torch.int64))
    out = torch.empty(4)
    for src in (x, base):
        kept_delta(src, base, (0, 0, 1), 1.0, out)
    row, base_row = torch.zeros(64, dtype=torch.bfloat16), torch.zeros(64)
    for src in (row, base_row):
        weighted_sum_merge([src], [1.0], base_row, slice(0, 64), 1.0, base_row.clone())
    wide = torch.zeros(1, 64)
    variance(wide, slice(0, 64), wide[0].clone())
    consensus_merge(wide, torch.ones(1), wide[0], slice(0, 64), True, 1.0, wide[0].clone())

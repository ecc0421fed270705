"""Sparsifying methods streamed in row blocks give the whole-tensor bytes.

The selection (:mod:`mergepipe.methods.select`) must pick exactly the entries a
stable sort would, ties included; the streamed L1 norm must have ``total``'s
bits; and the engine, cutting tensors into small row blocks, must write the
bytes the one-block (whole-tensor) computation writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from pathlib import Path

import pytest
import torch

from mergepipe.methods.kernels import high_histogram, low_bits_in_bins
from mergepipe.methods.reduce import CHUNK, GRAIN, StreamTotal, total
from mergepipe.methods.select import RankSelect, RankWindow, magnitude_bits, window_ranks
from tests.conftest import make_llama


def _pieces(n: int, g: torch.Generator) -> list[tuple[int, int]]:
    """Random consecutive cuts of range(n), some of them empty."""
    cuts = sorted({0, n, *torch.randint(0, n + 1, (5,), generator=g).tolist()})
    return list(zip(cuts, cuts[1:]))


def _window_mask(x: torch.Tensor, r0: int, r1: int, descending: bool,
                 pieces: list[tuple[int, int]], counted: bool = True) -> torch.Tensor:
    """The streaming selection, fed piece by piece as the engine feeds row blocks
    (``counted``: the window knows each block's ties from the statistics)."""
    ranks = window_ranks(x.numel(), r0, r1, descending)
    select = RankSelect([r for r in ranks if r is not None])
    for p in range(2):
        for a, b in pieces:
            select.observe(p, magnitude_bits(x[a:b]))
        select.end_pass(p)
    found = iter(select.boundaries)
    lo, hi = (None if r is None else next(found) for r in ranks)
    if not counted:
        lo, hi = (b if b is None else dataclasses.replace(b, per_block=None) for b in (lo, hi))
    window = RankWindow(r0, r1, lo, hi, x.numel(), descending)
    return torch.cat([window.mask(magnitude_bits(x[a:b])) for a, b in pieces])


def _stable_mask(x: torch.Tensor, r0: int, r1: int, descending: bool) -> torch.Tensor:
    order = torch.sort(x.abs(), descending=descending, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[r0:r1]] = True
    return mask


@pytest.mark.parametrize("n", [1, 7, 1000, 50_000])
def test_rank_window_keeps_what_a_stable_sort_keeps(n):
    g = torch.Generator().manual_seed(n)
    # few distinct magnitudes, both signs, zeros and -0.0: ties everywhere
    x = torch.randint(-6, 7, (n,), generator=g).float() * 0.25
    x[torch.randint(0, n, (n // 10,), generator=g)] = -0.0
    x[: n // 3] += torch.randn(n // 3, generator=g) * 1e-3   # and some distinct values
    windows = {(0, 1), (0, n), (0, max(1, n // 3)), (n // 5, n // 2), (n - 1, n),
               (n // 2, n // 2 + 1)}
    for r0, r1 in [(r0, r1) for r0, r1 in windows if r0 < r1]:   # empty ones never select
        for descending, counted in itertools.product((True, False), (True, False)):
            got = _window_mask(x, r0, r1, descending, _pieces(n, g), counted)
            want = _stable_mask(x, r0, r1, descending)
            assert torch.equal(got, want), (n, r0, r1, descending, counted)
            assert int(got.sum()) == r1 - r0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_compiled_selection_loops_count_what_torch_counts(dtype):
    """The numba loops of the statistics passes against the torch operations they
    replace: the high-bit histogram and the low bits of a bin, from (x, base) pairs
    or from bit patterns, on blocks with zeros, -0.0 and ties."""
    g = torch.Generator().manual_seed(3)
    n = 40_000
    base = torch.randn(n, generator=g) * 0.02
    x = (base + torch.randn(n, generator=g) * 1e-3).to(dtype)
    x[::7] = base[::7].to(dtype)            # deltas that round to zero (or not)
    x[::11] = -0.0
    bits = magnitude_bits(torch.sub(x, base))
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for a, b in [(0, 0), (0, 123), (123, n)]:
        high_histogram(x[a:b], base[a:b], hist)
    assert torch.equal(hist, torch.bincount(bits >> 16, minlength=1 << 15))
    from_bits = torch.zeros(1 << 15, dtype=torch.int64)
    high_histogram(bits, None, from_bits)
    assert torch.equal(from_bits, hist)
    busiest, top = int(hist.argmax()), int((bits >> 16).max())
    for src, b in ((x, base), (bits, None)):
        for hi, low in zip([busiest, top, 0x7FFF], low_bits_in_bins(src, b, [busiest, top, 0x7FFF])):
            want = (bits[(bits >> 16) == hi] & 0xFFFF).long()
            assert torch.equal(low, want)   # in flat order
    with pytest.raises(TypeError, match="int32"):
        high_histogram(x, None, hist)


@pytest.mark.parametrize("n_inputs", [1, 2, 3, 8, 16, 17])
def test_compiled_consensus_has_the_torch_codes_bits(n_inputs):
    """The merge pass's loops against the torch code they stand in for, bit for bit:
    sign election, the weight-normalised or plain sum, lambda, with mixed-sign weights
    and exact cancellations. Above CONSENSUS_MAX_INPUTS, and in a slice's last
    columns, torch sums in another order and the loop leaves them to it (a torch
    whose order changes fails here, not in a merge)."""
    from mergepipe.methods.kernels import CONSENSUS_MAX_INPUTS, consensus_merge, kept_delta
    from mergepipe.methods.task_arithmetic import _consensus

    g = torch.Generator().manual_seed(n_inputs)
    n = 70_001
    d = torch.randn(n_inputs, n, generator=g) * 1e-2
    d[torch.rand(d.shape, generator=g) < 0.5] = 0
    d[:, :300] = torch.randint(-2, 3, (n_inputs, 300), generator=g).float() * 0.5
    base = torch.randn(n, generator=g)
    for weights in ([0.3] * n_inputs, torch.linspace(-1, 1, n_inputs).tolist()):
        w = torch.tensor(weights)
        dw = d * w.reshape(-1, 1)
        for normalize, lam in itertools.product((True, False), (1.0, 0.7)):
            mixed, divisor = _consensus(dw, w.reshape(-1, 1), normalize)
            want = base + (mixed / divisor if normalize else mixed) * lam if lam != 1 else \
                base + (mixed / divisor if normalize else mixed)
            got = torch.full((n,), float("nan"))
            done = consensus_merge(dw, w, base, slice(5, n), normalize, lam, got)
            assert done == (n - 5) // 64 * 64 * (n_inputs <= CONSENSUS_MAX_INPUTS)
            assert got[:5].isnan().all() and got[5 + done:].isnan().all()
            assert torch.equal(got[5:5 + done].view(torch.int32),
                               want[5:5 + done].view(torch.int32))
    base16 = base.bfloat16().float()   # bf16 deltas: equal magnitudes are common
    x = (base16 + torch.randint(-3, 4, (n,), generator=g) * 2.0 ** -8).bfloat16()
    bits = magnitude_bits(torch.sub(x, base16))
    base = base16
    value = int(torch.mode(bits[bits > 0]).values)
    ties = int((bits == value).sum())
    assert ties > 10
    for cut in [(-1, 0, 0), (value, 0, ties), (value, 0, 0), (value, 3, ties - 4), (value, -5, 2),
                ((1 << 31) - 1, 0, 0)]:
        got = torch.empty(n)
        assert kept_delta(x, base, cut, -0.7, got) == int((bits == cut[0]).sum())
        tie_index = torch.cumsum((bits == cut[0]).long(), 0) - 1
        kept = (bits > cut[0]) | ((bits == cut[0]) & (tie_index >= cut[1]) & (tie_index < cut[2]))
        want = torch.sub(x, base)
        want[~kept] = 0.0
        assert torch.equal(got.view(torch.int32), (want * -0.7).view(torch.int32)), cut


@pytest.mark.parametrize("n_inputs", [1, 2, 3, 8, 16, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_weighted_sum_has_the_torch_codes_bits(n_inputs, dtype):
    """Task arithmetic's one-pass loop against the torch code it stands in for, bit
    for bit: each delta weighted, the deltas summed in input order from +0.0 (signed
    zeros included), lambda, then the base added. Above CONSENSUS_MAX_INPUTS and in
    a slice's last columns the loop leaves the work to torch."""
    from mergepipe.methods.kernels import CONSENSUS_MAX_INPUTS, weighted_sum_merge

    g = torch.Generator().manual_seed(100 + n_inputs)
    n = 70_001
    base = torch.randn(n, generator=g).to(dtype).float()
    base[:400:3] = -0.0
    xs = [(base + torch.randn(n, generator=g) * 1e-2).to(dtype) for _ in range(n_inputs)]
    for x in xs:
        x[:400] = base[:400].to(dtype)   # zero deltas over signed-zero bases
    for weights, lam in itertools.product(([0.3] * n_inputs,
                                           torch.linspace(-1, 1, n_inputs).tolist()),
                                          (1.0, 0.7)):
        deltas = torch.stack([(x.float() - base) * w for x, w in zip(xs, weights)])
        mixed = deltas.sum(dim=0)
        want = base + (mixed * lam if lam != 1 else mixed)
        got = torch.full((n,), float("nan"))
        done = weighted_sum_merge(xs, weights, base, slice(5, n), lam, got)
        assert done == (n - 5) // 64 * 64 * (n_inputs <= CONSENSUS_MAX_INPUTS)
        assert got[:5].isnan().all() and got[5 + done:].isnan().all()
        assert torch.equal(got[5:5 + done].view(torch.int32), want[5:5 + done].view(torch.int32))
    assert weighted_sum_merge([xs[0], xs[0].float()] if dtype == torch.bfloat16 else
                              [xs[0], xs[0].bfloat16()], [1.0, 1.0], base, slice(0, n), 1.0,
                              got) == 0   # mixed dtypes: the torch code runs


@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_task_arithmetic_blocks_equal_the_torch_code(lam, monkeypatch):
    """A block merged by the loop with torch taking its last columns has the bytes
    of the torch code alone (bf16 inputs, a size no multiple of 64, a skipped input)."""
    from mergepipe.methods import kernels
    from mergepipe.methods.base import TensorContext, get_method

    g = torch.Generator().manual_seed(9)
    base = torch.randn(37, 1001, generator=g).bfloat16().float()
    xs = [(base + torch.randn(base.shape, generator=g) * 0.01).bfloat16() for _ in range(3)]
    inputs = [xs[0], base, xs[1], xs[2]]   # the base itself: an unselected input
    ctx = TensorContext("t", tuple(base.shape), ("a", "b", "c", "d"))
    params = {"weight": [0.4, 0.2, -0.3, 0.5], "normalize": False, "lambda": lam,
              "rescale": False, "int8_mask": False}
    fn = get_method("task_arithmetic").fn
    got = fn(ctx, base, inputs, params)
    monkeypatch.setattr(kernels, "weighted_sum_merge", lambda *a, **k: 0)
    want = fn(ctx, base, inputs, params)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_selection_from_inputs_finds_the_boundaries_of_their_deltas(dtype):
    """RankSelect fed (x, base) blocks, as TIES feeds it, finds what it finds from the
    deltas' bit patterns, block tie counts included."""
    g = torch.Generator().manual_seed(5)
    n = 30_000
    base = (torch.randn(n, generator=g) * 0.02).to(dtype).float()
    x = (base + torch.randint(-3, 4, (n,), generator=g) * 2.0 ** -10).to(dtype)
    pieces = _pieces(n, g)
    found = []
    for pair in (True, False):
        select = RankSelect([n // 3, n - 5])
        for p in range(2):
            for a, b in pieces:
                if pair:
                    select.observe(p, x[a:b], base[a:b])
                else:
                    select.observe(p, magnitude_bits(torch.sub(x[a:b], base[a:b])))
            select.end_pass(p)
        found.append(select.boundaries)
    assert found[0] == found[1]


@pytest.mark.parametrize("n", [0, 5, GRAIN - 1, GRAIN, GRAIN + 5, 5 * CHUNK, 7 * CHUNK + 3,
                               40 * CHUNK + 17])
def test_stream_total_has_the_bits_of_total(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).abs() * 1e3
    acc = StreamTotal(n)
    for a, b in _pieces(n, g):
        acc.add(x[a:b])
    assert torch.equal(acc.result(), total(x))


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory) -> dict[str, Path]:
    """bf16 checkpoints, whose deltas repeat values: ties at every threshold."""
    root = tmp_path_factory.mktemp("streamed")
    kw = dict(layers=1, hidden=64, vocab=96, dtype=torch.bfloat16)
    base = make_llama(root / "base", 40, **kw)
    return {"base": base, **{f"x{k}": make_llama(root / f"x{k}", 40 + k, base=base, **kw)
                             for k in (1, 2, 3)}}


def _spec(method: str, family: dict[str, Path], params: dict | None = None, **extra) -> dict:
    return {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32",
            "models": [{"model": str(family[f"x{k}"]),
                        "parameters": {"weight": w, "density": d, **extra}}
                       for k, w, d in ((1, 0.7, 0.3), (2, 0.5, 0.55), (3, 1.0, 0.9))],
            "parameters": params or {}}


SPECS = {
    "ties": ("ties", {}, {}),
    "ties_rescaled": ("ties", {"rescale": True, "normalize": False}, {}),
    "breadcrumbs": ("breadcrumbs", {}, {"gamma": 0.05}),
    "breadcrumbs_ties_rescaled": ("breadcrumbs_ties", {"rescale": True}, {"gamma": 0.2}),
    "dare_ties": ("dare_ties", {}, {}),
    "dare_linear": ("dare_linear", {"rescale": False}, {}),
    "della": ("della", {"lambda": 0.8}, {"epsilon": 0.05}),
    "della_linear": ("della_linear", {}, {"epsilon": 0.08}),
}


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_small_row_blocks_write_the_whole_tensor_bytes(name, bf16_family, tmp_path):
    from mergepipe import api

    method, params, extra = SPECS[name]
    with api.open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, _spec(method, bf16_family, params, **extra), seed=3,
                              store=False)
    # magnitude ranks need statistics passes; random masks only for their L1 rescale
    needs_stats = not method.startswith(("dare", "della")) or params.get("rescale", True)
    _blocks_write_whole_bytes(plan, tmp_path, needs_stats)


@pytest.mark.parametrize("topk", [1.0, 0.4, 0.0])
def test_sce_in_small_row_blocks_writes_the_whole_tensor_bytes(topk, bf16_family, tmp_path):
    """SCE's variance cut (ties included: bf16 deltas), energy sums and sign election."""
    from mergepipe import api

    spec = {"merge_method": "sce", "base_model": str(bf16_family["base"]), "dtype": "float32",
            "models": [{"model": str(bf16_family[f"x{k}"])} for k in (1, 2, 3)],
            "parameters": {"select_topk": topk}}
    with api.open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, spec, store=False)
    _blocks_write_whole_bytes(plan, tmp_path, needs_stats=True)


def _blocks_write_whole_bytes(plan, tmp_path: Path, needs_stats: bool) -> None:
    from mergepipe import api

    whole = api.execute_plan(plan, tmp_path / "whole")   # every tensor is one block
    # ~3 rows a block, each statistics pass reading them again
    rows = api.execute_plan(plan, tmp_path / "rows", block_bytes=3 * 256, cache_bytes=0)
    # the same blocks read once and kept for every pass
    kept = api.execute_plan(plan, tmp_path / "kept", block_bytes=3 * 256)
    assert _sha(tmp_path / "whole") == _sha(tmp_path / "rows") == _sha(tmp_path / "kept")
    assert kept.bytes_read == rows.bytes_read and kept.phases["reread_bytes"] == 0
    # statistics passes read again, but bytes_read counts each planned byte once
    assert rows.bytes_read == whole.bytes_read
    assert rows.bytes_read_experts == sum(s.nbytes for t in plan.tasks for s in t.inputs)
    assert (rows.phases["reread_bytes"] > 0) == needs_stats
    assert set(rows.phases) >= {"read", "decode", "stats", "math", "encode", "write", "hash",
                                "fsync", "threads", "cores"}


def test_apply_records_the_phases_with_the_run(bf16_family, tmp_path):
    """The per-phase seconds reach apply's result and the output's manifest."""
    import json

    from mergepipe import api
    from mergepipe.runs.manifest import MANIFEST

    with api.open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, _spec("ties", bf16_family))
        res = api.apply_plan(cat, plan, tmp_path / "out", block_bytes=3 * 256)
        shown = api.explain(cat, res.run_id[:10])["extra_lines"]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    phase_line = next(line for line in shown if line.startswith("engine phases: "))
    for name in ("read", "read_ahead", "verify", "decode", "math", "encode", "write", "hash",
                 "fsync"):
        assert f"{name} {res.phases[name]:.2f} s" in phase_line
    assert manifest["phases"] == res.phases
    # tensors this small are read once and kept for their statistics passes
    assert res.phases["reread_bytes"] == 0 and res.phases["threads"] >= 1
    assert res.phases["math"] > 0 and res.phases["read_ahead"] > 0
    # the statistics passes were scheduled too: the read-ahead read nothing the merge skipped
    assert res.phases["readahead_unused_bytes"] == 0


def test_threads_follow_the_usable_cores_and_are_put_back(bf16_family, tmp_path):
    from mergepipe import api
    from mergepipe.engine.execute import default_threads, usable_cores

    before = torch.get_num_threads()
    with api.open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, _spec("ties", bf16_family), store=False)
    auto = api.execute_plan(plan, tmp_path / "auto")
    one = api.execute_plan(plan, tmp_path / "one", threads=1)
    assert torch.get_num_threads() == before
    assert auto.phases["threads"] == default_threads() == max(1, usable_cores() - 1)
    assert auto.phases["cores"] == usable_cores()
    assert one.phases["threads"] == 1
    assert _sha(tmp_path / "auto") == _sha(tmp_path / "one")


@pytest.mark.parametrize("weights", [(0.7, 0.5, 1.0, 0.3), (0.7, -0.5, 1.0, 0.3)])
def test_column_stepped_consensus_has_mergekits_bits(weights):
    """The sign election in cache-sized column steps equals mergekit's whole-tensor one."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    from mergepipe.methods.task_arithmetic import STEP_COLUMNS, _consensus

    g = torch.Generator().manual_seed(5)
    n = 2 * STEP_COLUMNS + 777
    deltas = torch.randn(len(weights), n, generator=g).bfloat16().float()   # ties and zeros
    deltas[torch.rand(deltas.shape, generator=g) < 0.4] = 0
    deltas[:, :50] = 0                                    # columns where nothing agrees
    w = torch.tensor(weights).reshape(-1, 1)
    deltas.mul_(w)
    mask = get_mask(deltas, method="sum")
    want_mixed = (deltas * mask).sum(dim=0)
    want_divisor = (w * mask).sum(dim=0)
    want_divisor[want_divisor == 0] = 1
    steps = [_consensus(deltas[:, a:a + STEP_COLUMNS], w, normalize=True)
             for a in range(0, n, STEP_COLUMNS)]
    mixed = torch.cat([m for m, _ in steps])
    divisor = torch.cat([d for _, d in steps])
    assert torch.equal(mixed, want_mixed)
    assert torch.equal(mixed / divisor, want_mixed / want_divisor)


def _sce_streamed(base: torch.Tensor, inputs: list[torch.Tensor], topk: float,
                  pieces: list[tuple[int, int]]) -> torch.Tensor:
    from mergepipe.methods.base import TensorContext
    from mergepipe.methods.sce import SceStream

    ctx = TensorContext("t", tuple(base.shape), tuple(f"m{k}" for k in range(len(inputs))))
    stream = SceStream(ctx, {"select_topk": topk}, len(inputs))
    for p in range(stream.passes):
        for a, b in pieces:
            stream.observe(p, base[a:b], [x[a:b] for x in inputs])
        stream.end_pass(p)
    return torch.cat([stream.merge(base[a:b], [x[a:b] for x in inputs]) for a, b in pieces])


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_stream_equals_mergekit_above_the_grain(topk):
    """Past torch's grain the energy sums go in fixed chunks (mergekit: torch's own
    order), so the weights may differ in the last bit; the selection and the sign
    election are the same, so the outputs agree to float32 rounding."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.merge_methods.sce import sce_mask, sce_weight

    g = torch.Generator().manual_seed(11)
    base = torch.randn(300, 200, generator=g)
    inputs = [base + 0.01 * torch.randn(300, 200, generator=g) for _ in range(3)]
    assert base.numel() > GRAIN
    tvs = torch.stack([x - base for x in inputs])
    if topk < 1:
        tvs = tvs * sce_mask(tvs, topk, tvs.dtype).unsqueeze(0)
    w = sce_weight(tvs)[:, None, None] * get_mask(tvs, method="sum", mask_dtype=tvs.dtype)
    want = base + (tvs * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)
    got = _sce_streamed(base, inputs, topk, _pieces(300, g))
    assert torch.equal(got, _sce_streamed(base, inputs, topk, [(0, 300)]))
    assert torch.equal(got == base, want == base)     # the same entries are merged
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("notes", [True, False])
def test_sce_computes_variances_only_to_find_the_cut(notes, monkeypatch):
    """Pass 1 notes each entry against the cut's bin, so the energy and merge passes
    apply the kept selection: variances are computed in passes 0 and 1 only. With
    the bin too full to note (``notes`` False) the energy pass computes them once more
    and keeps the selection for the merge pass. Either way the bytes are those of
    the whole tensor as one block, with many tied variances at the cut."""
    from mergepipe.methods import sce

    if not notes:
        monkeypatch.setattr(sce, "BIN_NOTES_BYTES", 0)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(90, 70, generator=g)
    inputs = [base + 0.01 * torch.randint(-3, 4, (90, 70), generator=g).float()
              for _ in range(3)]
    pieces = _pieces(90, g)
    want = _sce_streamed(base, inputs, 0.4, [(0, 90)])
    calls = []
    real = sce.variance
    monkeypatch.setattr(sce, "variance", lambda tvs: calls.append(1) or real(tvs))
    got = _sce_streamed(base, inputs, 0.4, pieces)
    assert len(calls) == (2 if notes else 3) * len(pieces)
    assert torch.equal(got, want)


def test_sce_keeps_the_earliest_of_tied_variances():
    """Where variances tie at the cut, the first entries in flat order are selected."""
    g = torch.Generator().manual_seed(2)
    v = torch.randint(1, 4, (40, 16), generator=g).float()   # three distinct variances
    base = torch.zeros_like(v)
    out = _sce_streamed(base, [v, -v], 0.45, _pieces(40, g))
    k = int(torch.tensor(v.numel()) * 0.45)
    order = torch.sort(v.reshape(-1), descending=True, stable=True).indices
    selected = torch.zeros(v.numel(), dtype=torch.bool)
    selected[order[:k]] = True
    # a selected entry keeps the positive task vector (the sum is 0: + wins), others stay 0
    assert torch.equal(out.reshape(-1) != 0, selected)


@pytest.mark.parametrize("n_inputs", [1, 2, 3, 8])
def test_sce_variance_has_torchs_bits(n_inputs):
    """The vectorised Welford update gives torch.var's float32 result exactly (ties,
    zeros, signed zeros, spread magnitudes; more columns than one step)."""
    from mergepipe.methods.sce import VAR_STEP, variance

    g = torch.Generator().manual_seed(n_inputs)
    base = torch.randn(3, VAR_STEP + 999, generator=g) * 10 ** torch.randint(
        -4, 4, (3, VAR_STEP + 999), generator=g).float()
    tvs = torch.stack([(base + 0.01 * torch.randn(base.shape, generator=g)).bfloat16().float()
                       - base for _ in range(n_inputs)])
    tvs[:, 0, :64] = 0
    tvs[0, 1, :64] = -0.0
    assert torch.equal(variance(tvs), torch.var(tvs, dim=0, unbiased=False))
    assert torch.equal(variance(tvs[:, 0]), torch.var(tvs[:, 0], dim=0, unbiased=False))

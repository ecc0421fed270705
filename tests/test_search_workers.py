"""The local worker pool and the asynchronous scheduler, with real cheap jobs in real processes."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from mergepipe.search.acquisition import score_each
from mergepipe.search.algorithms import (APBMM, History, make_algorithm, sobol_design,
                                         with_sources)
from mergepipe.search.rerank import DUPLICATE_TOL, rms_distance
from mergepipe.search.space import LayerSpace
from mergepipe.search.workers import LocalPool


@dataclass
class SleepJob:
    """Sleeps (or waits for a flag file), then reports which process ran it."""

    seconds: float
    fail: bool = False
    die: bool = False
    until: str | None = None

    def run(self) -> dict:
        time.sleep(self.seconds)
        while self.until and not os.path.exists(self.until):
            time.sleep(0.02)
        if self.die:
            os._exit(9)
        if self.fail:
            raise ValueError("bad candidate")
        return {"pid": os.getpid(), "slept": self.seconds}


def test_pool_frees_each_worker_as_its_own_job_finishes(tmp_path):
    flag = tmp_path / "release"
    with LocalPool(2, prefix="t.w", warm=()) as pool:
        assert pool.free() == ["t.w0", "t.w1"]
        pool.submit("t.w0", 0, SleepJob(0.1))
        pool.submit("t.w1", 1, SleepJob(1.5, until=str(flag)))   # held until released below
        assert pool.free() == []
        first = pool.wait(timeout=None)
        assert [r.trial for r in first] == [0] and first[0].ok
        assert pool.free() == ["t.w0"]          # the fast worker is free while the slow one runs
        flag.touch()
        pool.submit("t.w0", 2, SleepJob(0.0, fail=True))
        results = []
        while len(results) < 2:
            results += pool.wait(timeout=None)
        by_trial = {r.trial: r for r in results}
        assert by_trial[1].ok and by_trial[1].value["slept"] == 1.5
        assert not by_trial[2].ok and "bad candidate" in by_trial[2].error
        assert by_trial[1].value["pid"] != os.getpid()
        assert by_trial[1].busy_s >= 1.0


@dataclass
class ImportedJob:
    """Reports whether a module was imported in the worker before this job ran."""

    module: str

    def run(self) -> dict:
        import sys
        return {"imported": self.module in sys.modules}


def test_workers_are_warm_before_the_first_trial():
    """``wait_ready`` returns once every worker has imported its warm modules, so a
    trial's busy time is evaluation, not start-up (transformers alone takes seconds)."""
    with LocalPool(2, warm=("mergepipe.engine.execute",)) as pool:
        pool.wait_ready()
        for i, w in enumerate(pool.free()):
            pool.submit(w, i, ImportedJob("mergepipe.engine.execute"))
        results = pool.wait(timeout=None)
        while len(results) < 2:
            results += pool.wait(timeout=None)
        assert all(r.ok and r.value["imported"] for r in results)
    with LocalPool(1, warm=()) as cold:
        cold.wait_ready()
        cold.submit("w0", 0, ImportedJob("mergepipe.engine.execute"))
        assert cold.wait(timeout=None)[0].value["imported"] is False


def test_a_worker_that_dies_fails_its_trial_and_is_replaced():
    with LocalPool(1, warm=()) as pool:
        pool.submit("w0", 7, SleepJob(0.0, die=True))
        res = pool.wait(timeout=None)
        assert len(res) == 1 and not res[0].ok and "died" in res[0].error
        pool.submit("w0", 8, SleepJob(0.0))
        again = pool.wait(timeout=None)
        assert again[0].ok and again[0].trial == 8


def _toy(X: torch.Tensor) -> torch.Tensor:
    acc = X[:, :3].mean(-1)
    return torch.stack([acc, 1 - X[:, 1:4].mean(-1) ** 2], -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_proposal_duplicates_a_candidate_in_flight(seed):
    torch.set_num_threads(1)
    space = LayerSpace(5)
    alg = make_algorithm("apbmm", space, 6, 20, seed, [1.0, 0.5, 0.5, 2.0, 5.0, 5.0])
    assert isinstance(alg, APBMM)
    X = sobol_design(space.dim, 8, seed)
    Y = _toy(X)
    # In flight: the best points seen so far, where an acquisition would like to go again.
    best = torch.argsort(Y.sum(-1), descending=True)[:3]
    pending = X[best] + 1e-4
    picks = torch.tensor(alg.propose(History(X, Y, pending), 3), dtype=torch.double)
    assert picks.shape == (3, space.dim)
    assert float(rms_distance(picks, pending).min()) >= DUPLICATE_TOL
    assert float(rms_distance(picks, picks).add(torch.eye(3) * 9).min()) >= DUPLICATE_TOL


def test_sobol_design_is_shared_by_algorithms_with_the_same_seed():
    space = LayerSpace(4)
    a = make_algorithm("apbmm", space, 8, 40, 3)
    b = make_algorithm("sync-qnehvi", space, 8, 40, 3)
    c = make_algorithm("sobol", space, 8, 40, 3)
    for t in range(8):
        assert a.fixed_point(t) == b.fixed_point(t) == c.fixed_point(t)
    assert a.fixed_point(8) is None and c.fixed_point(8) is not None
    assert make_algorithm("apbmm", space, 8, 40, 4).fixed_point(0) != a.fixed_point(0)
    grid = make_algorithm("grid-ta", space, 8, 3, 3)
    assert [grid.fixed_point(t) for t in range(3)] == [[0.25], [0.5], [0.75]]


def test_apbmm_pool_adds_model_level_merges_and_moves_around_the_front():
    space = LayerSpace(3)
    alg = make_algorithm("apbmm", space, 4, 20, 0)
    X = sobol_design(space.dim, 6, 0)
    Y = _toy(X)
    seeds = alg.seeds(History(X, Y, X[:0]))
    diagonal = seeds[(seeds - seeds[:, :1]).abs().max(-1).values < 1e-12]
    assert diagonal.shape[0] >= 19 and float(diagonal.min()) > 0 and float(diagonal.max()) < 1
    assert seeds.shape[0] > diagonal.shape[0] and float(seeds.min()) >= 0 and float(seeds.max()) <= 1


def _has(points: torch.Tensor, x: list[float]) -> bool:
    return bool(((points - torch.tensor(x, dtype=torch.double)).abs() < 1e-9).all(-1).any())


def test_apbmm_pool_holds_the_edges_on_the_priors_paths():
    X = sobol_design(3, 6, 0)
    # two layers and the head, importance in that order: the paths hand layer 0,
    # then layer 1, then the head over (and the reverse order), plus single swaps
    small = make_algorithm("apbmm", LayerSpace(2), 4, 20, 0, [0.5, 1.0, 2.0])
    edges = small.edges()
    on_edge = ((edges == 0) | (edges == 1)).sum(-1) >= 2
    assert bool(on_edge.all())
    kept = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5],        # one group from the reasoning model
            [1, 0.5, 0], [1, 1, 0.5],                      # the prior's path onwards
            [0, 0.5, 1], [0.5, 1, 1], [1, 0.5, 1]]         # back from the reasoning model
    off = [[1, 0, 0.5], [0.5, 1, 0], [0, 1, 0.5], [0.5, 0, 1]]   # edges on no such path
    for x in kept:
        assert _has(edges, x), x
    for x in off:
        assert not _has(edges, x), x
    assert not _has(edges, [0, 0, 0]) and not _has(edges, [1, 1, 1])   # the sources
    pool = small.seeds(History(X, _toy(X), X[:0]))
    assert all(bool((pool == e).all(-1).any()) for e in edges)
    # a large space: single swaps both ways and the paths in the prior's order
    ls = [2.0, 0.5, 1.0, 5.0, 0.5, 5.0, 5.0, 5.0, 2.0]
    big = make_algorithm("apbmm", LayerSpace(8), 4, 20, 0, ls).edges()
    for i in range(9):
        e = [0.0] * 9
        e[i] = 0.5
        assert _has(big, e) and _has(big, [1 - v for v in e])
    # the path: layer 1 first, then layer 4 (equal lengthscales go by index), then 2 …
    assert _has(big, [0, 1, 0, 0, 0.5, 0, 0, 0, 0])
    assert _has(big, [0, 1, 0.5, 0, 1, 0, 0, 0, 0])
    assert not _has(big, [0, 0, 0.5, 0, 1, 0, 0, 0, 0])   # not an edge on any such path
    assert not _has(big, [0] * 9) and not _has(big, [1] * 9)


def test_apbmm_measures_improvement_against_the_front_with_the_sources():
    # trials on a middle front, far from both sources: measured against the
    # trials alone, a merge next to the reasoning (or base) corner would add the
    # whole strip out to that source, ~0.1 of hypervolume; against the front a
    # user gets, with the sources on it, it adds next to nothing
    alg = make_algorithm("apbmm", LayerSpace(2), 8, 40, 0, [0.5, 1.0, 2.0])
    X = sobol_design(3, 8, 0)
    m = X.mean(-1)
    history = History(X, torch.stack([0.2 + 0.5 * m, 0.7 - 0.5 * m], -1), X[:0])
    _, acq = alg.acquisition(history)
    near_sources = torch.tensor([[0.99] * 3, [0.01] * 3], dtype=torch.double)
    assert float(score_each(acq, near_sources).exp().max()) < 0.01
    picks = torch.tensor(alg.propose(history, 4), dtype=torch.double)
    corners = torch.tensor([[0.0] * 3, [1.0] * 3], dtype=torch.double)
    assert picks.shape == (4, 3) and float(rms_distance(picks, corners).min()) >= DUPLICATE_TOL


def test_apbmm_bridges_the_largest_front_gaps_including_the_sources():
    space = LayerSpace(3)
    alg = make_algorithm("apbmm", space, 4, 20, 0)
    # the front with the sources at its ends: base (x=0) → a → b → c → reasoning (x=1);
    # gap lengths ≈ 0.11, 0.65, 0.78, 0.06: the three at or above the (lower) median
    # are bridged, the short one next to reasoning is not
    X = torch.tensor([[0.1] * 4, [0.6] * 4, [0.9] * 4], dtype=torch.double)
    Y = torch.tensor([[0.05, 0.9], [0.4, 0.4], [0.95, 0.03]], dtype=torch.double)
    bridges = alg.bridges(History(X, Y, X[:0]))
    assert bridges.shape == (3 * 3, space.dim)
    got = sorted(round(float(v), 6) for v in bridges[:, 0])
    want = sorted(round(a + t * (b - a), 6) for a, b in ((0.0, 0.1), (0.1, 0.6), (0.6, 0.9))
                  for t in (0.25, 0.5, 0.75))
    assert got == want
    # a dominated trial is no end of a bridge
    Xd = torch.cat([X, torch.full((1, 4), 0.3, dtype=torch.double)])
    Yd = torch.cat([Y, torch.tensor([[0.0, 0.3]], dtype=torch.double)])
    assert torch.equal(alg.bridges(History(Xd, Yd, Xd[:0])), bridges)
    # and they are part of the pool the acquisition scores
    pool = alg.seeds(History(X, Y, X[:0]))
    # (compared exactly: both come from the same arithmetic, and torch.cdist's matmul path
    # for larger inputs would leave ~1e-8 of rounding in a zero distance)
    assert all(bool((pool == b).all(-1).any()) for b in bridges)


def test_apbmm_halves_the_closest_pair_that_straddles_each_front_gap():
    """A merge near the base that answers like it, one further along the same edge
    that jumps to a plateau: the ramp between them is where the front's missing piece
    lies, and a batch's last places go to the midpoints of the largest gaps' pairs."""
    alg = make_algorithm("apbmm", LayerSpace(2), 4, 20, 0)
    X = torch.tensor([[0.3, 0, 0], [0.1, 0.1, 0.1], [0.58, 0, 0], [0.9, 0.9, 0.9],
                      [0.44, 0.01, 0.0]], dtype=torch.double)
    Y = torch.tensor([[0.014, 1.0], [0.0, 1.0], [0.27, 0.64], [0.9, 0.05], [-0.2, -0.2]],
                     dtype=torch.double)   # the last one failed: it brackets nothing
    Xs, Ys = with_sources(History(X, Y, X[:0]))
    got = [[round(v, 6) for v in p] for p in alg.straddles(Xs, Ys)]
    # gaps by area: 0.27 → 0.9 (pair 0.58,0,0 and 0.9,...), 0.014 → 0.27 (the edge's
    # pair), 0.9 → reasoning (the last trial and the corner)
    assert got == [[0.74, 0.45, 0.45], [0.44, 0.0, 0.0], [0.95, 0.95, 0.95]]
    # a pair as close as the duplicate tolerance is a cliff, not a ramp: skipped
    Xc = torch.cat([Xs, torch.tensor([[0.305, 0, 0]], dtype=torch.double)])
    Yc = torch.cat([Ys, torch.tensor([[0.27, 0.64]], dtype=torch.double)])
    assert [0.44, 0.0, 0.0] not in [[round(v, 6) for v in p] for p in alg.straddles(Xc, Yc)]
    # a batch of three: the rerank's best, then the largest gaps' midpoints, less the
    # one that repeats the failed trial (tried: it would learn nothing)
    picks = alg.propose(History(X, Y, X[:0]), 3)
    assert [[round(v, 6) for v in p] for p in picks[1:]] == [[0.74, 0.45, 0.45],
                                                           [0.95, 0.95, 0.95]]


def test_a_freed_worker_runs_a_straddle_of_the_newest_front_when_the_ready_batch_is_stale():
    """With refits slower than evaluations, the ready batch was chosen without the
    last few results; a straddle needs only the results, so it goes first, and ready
    points that repeat a point handed out since are dropped."""
    from mergepipe.search.coordinator import MAX_LAG, SearchRun

    run = SearchRun.__new__(SearchRun)
    run.alg = make_algorithm("apbmm", LayerSpace(2), 4, 20, 0)
    run.X = [[0.3, 0, 0], [0.1, 0.1, 0.1], [0.58, 0, 0], [0.9, 0.9, 0.9]]
    run.Y = [[0.014, 1.0], [0.0, 1.0], [0.27, 0.64], [0.9, 0.05]]
    run.inflight = {}
    ready = [[0.5, 0.5, 0.5], [0.2, 0.6, 0.2]]
    # chosen on the whole history: the batch goes first, in its order
    assert run._next_point(ready, len(run.Y)) == [0.5, 0.5, 0.5] and len(ready) == 1
    # chosen before the last MAX_LAG + 1 results: the largest gap's straddle first,
    # and the ready point waits
    stale = len(run.Y) - MAX_LAG - 1
    assert [round(v, 6) for v in run._next_point(ready, stale)] == [0.74, 0.45, 0.45]
    assert ready == [[0.2, 0.6, 0.2]]
    # once that straddle is in flight, the next gap's
    run.inflight = {7: SimpleNamespace(x=[0.74, 0.45, 0.45])}
    assert [round(v, 6) for v in run._next_point(ready, stale)] == [0.44, 0.0, 0.0]
    # no straddle left to run: the ready batch, less what was handed out meanwhile
    run.alg.immediate = lambda history: []
    ready = [[0.74, 0.45, 0.45], [0.2, 0.6, 0.2]]
    assert run._next_point(ready, stale) == [0.2, 0.6, 0.2] and ready == []
    assert run._next_point([[0.74, 0.45, 0.45]], stale) is None

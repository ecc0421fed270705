"""The background proposer: the caller is never blocked, and pending points stay pending."""
from __future__ import annotations

import torch

from mergepipe.search.algorithms import make_algorithm, sobol_design
from mergepipe.search.proposer import Proposer, propose_points, unseen
from mergepipe.search.rerank import DUPLICATE_TOL, rms_distance
from mergepipe.search.space import LayerSpace


def _toy(X: torch.Tensor) -> torch.Tensor:
    return torch.stack([X[:, :3].mean(-1), 1 - X[:, 1:4].mean(-1) ** 2], -1)


def test_a_batch_is_computed_beside_the_caller_and_avoids_pending_points():
    torch.set_num_threads(1)
    space = LayerSpace(5)
    alg = make_algorithm("apbmm", space, 6, 20, 0, [1.0, 0.5, 0.5, 2.0, 5.0, 5.0])
    X = sobol_design(space.dim, 8, 0)
    Y = _toy(X)
    pending = (X[torch.argsort(Y.sum(-1), descending=True)[:3]] + 1e-4).tolist()
    proposer = Proposer(alg)
    try:
        proposer.request(X.tolist(), Y.tolist(), pending, 4, 8, version=8)
        assert proposer.busy            # request returned at once; the refit runs in a process
        version, points = proposer.take(block=True)
        assert not proposer.busy and proposer.take() is None
    finally:
        proposer.close()
    picks = torch.tensor(points, dtype=torch.double)
    assert version == 8 and picks.shape == (4, space.dim)
    assert float(rms_distance(picks, torch.tensor(pending)).min()) >= DUPLICATE_TOL
    # the same snapshot gives the same batch in the caller's thread (seeded per history size)
    assert propose_points(alg, X.tolist(), Y.tolist(), pending, 4, 8) == points


def test_before_two_results_the_shared_design_continues():
    space = LayerSpace(3)
    alg = make_algorithm("apbmm", space, 1, 10, 2)
    got = propose_points(alg, [[0.5] * 4], [[0.1, 0.2]], [], 2, 3)
    assert got == [alg.design()[3].tolist(), alg.design()[4].tolist()]


def test_a_batch_asked_for_before_the_initial_design_is_handed_out_skips_that_design():
    """With 4 workers and 8 initial points, the first batch is requested once trials
    0-3 run, at trial 4; it is handed out after trials 4-7 (the design's fixed points),
    so it must not repeat them — it once did, and every AP-BMM run spent 4 of its
    evaluations on copies."""
    space = LayerSpace(3)
    alg = make_algorithm("apbmm", space, 8, 40, 0)
    design = alg.design()
    got = torch.tensor(propose_points(alg, [], [], design[:4].tolist(), 4, 4))
    assert got.shape == (4, space.dim)
    assert float(rms_distance(got, design[:8]).min()) >= DUPLICATE_TOL
    assert got.tolist() == design[8:12].tolist()
    # a point in flight is skipped too
    again = propose_points(alg, [[0.5] * 4], [[0.1, 0.2]], design[8:9].tolist(), 2, 8)
    assert again == design[9:11].tolist()


def test_a_batch_drops_points_handed_out_while_it_was_computed():
    taken = [[0.2, 0.2, 0.2], [0.9, 0.1, 0.5]]
    batch = [[0.2, 0.2, 0.2 + 1e-4],      # the same candidate as one already handed out
             [0.5, 0.5, 0.5],
             [0.5, 0.5, 0.5 + 1e-4],      # a repeat within the batch itself
             [0.9, 0.1, 0.6]]             # near, but a different candidate
    assert unseen(batch, taken) == [[0.5, 0.5, 0.5], [0.9, 0.1, 0.6]]
    assert unseen(batch, []) == [batch[0], batch[1], batch[3]]


def test_a_proposal_does_not_depend_on_the_order_results_came_in():
    """Workers finish in any order; the same finished and pending points must give the
    same batch, or a synchronous search hangs on timing and a resume on its reading
    order (before, the first synchronous batch moved by up to 0.06 per coordinate)."""
    torch.set_num_threads(1)
    space = LayerSpace(2)
    X = sobol_design(space.dim, 9, 3)
    Y = _toy(torch.cat([X, X[:, :1]], -1))
    shuffled = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    for name in ("sync-qnehvi", "apbmm"):
        alg = make_algorithm(name, space, 8, 40, 0, [0.5, 1.0, 2.0])
        pending = [] if name == "sync-qnehvi" else [X[8].tolist(), [0.9, 0.1, 0.5]]
        first = propose_points(alg, X[:8].tolist(), Y[:8].tolist(), pending, 3, 8)
        again = propose_points(alg, X[shuffled].tolist(), Y[shuffled].tolist(),
                               pending[::-1], 3, 8)
        assert len(first) == 3 and again == first, name

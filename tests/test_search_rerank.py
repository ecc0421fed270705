"""The gap-aware rerank: gaps attract, pending points repel, duplicates are refused."""
from __future__ import annotations

import torch

from mergepipe.search.rerank import front_gaps, gap_reward, rerank


def t(x):
    return torch.tensor(x, dtype=torch.double)


def test_largest_gap_midpoint_is_rewarded_most():
    front = t([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])
    mids, lengths = front_gaps(front)
    assert torch.allclose(mids[torch.argmax(lengths)], t([0.55, 0.45]))
    r = gap_reward(t([[0.55, 0.45], [0.05, 0.95], [0.9, 0.1]]), front)
    assert r[0] > r[2] > r[1] - 1e-12 and r[0] > 0.9


def test_gap_reward_breaks_ties_between_equal_scores():
    front = t([[0.0, 1.0], [0.1, 0.9], [1.0, 0.0]])
    pool = t([[0.1] * 3, [0.9] * 3])
    means = t([[0.05, 0.95], [0.55, 0.45]])
    picks = rerank(pool, t([1.0, 1.0]), means, front, torch.zeros(0, 3, dtype=torch.double), 1)
    assert picks == [1]


def test_pending_points_repel_and_duplicates_are_never_picked():
    pool = t([[0.5, 0.5], [0.52, 0.5], [0.9, 0.1], [0.0, 0.0]])
    scores = t([1.0, 0.99, 0.985, 0.0])
    means = t([[0.5, 0.5]] * 4)
    front = t([[0.0, 1.0], [1.0, 0.0]])
    pending = t([[0.5, 0.5]])
    picks = rerank(pool, scores, means, front, pending, 4)
    assert 0 not in picks                    # identical to an in-flight candidate
    assert picks[0] == 2                     # the near-duplicate loses to a distant point
    picks_free = rerank(pool, scores, means, front, torch.zeros(0, 2, dtype=torch.double), 1)
    assert picks_free == [0]                 # …which it would not without the pending point


def test_finished_points_are_never_picked_again_but_do_not_repel():
    pool = t([[0.5, 0.5], [0.53, 0.5], [0.9, 0.1], [0.0, 0.0]])
    scores = t([1.0, 0.99, 0.98, 0.0])
    means = t([[0.5, 0.5]] * 4)
    front = t([[0.0, 1.0], [1.0, 0.0]])
    none = torch.zeros(0, 2, dtype=torch.double)
    # a finished point is no candidate, yet its neighbour keeps its full score
    assert rerank(pool, scores, means, front, none, 1, evaluated=t([[0.5, 0.5]])) == [1]
    # the same point in flight would also push the neighbour below the distant one
    assert rerank(pool, scores, means, front, t([[0.5, 0.5]]), 1) == [2]
    # every candidate already evaluated: nothing comes back (the caller tops up)
    assert rerank(pool, scores, means, front, none, 4, evaluated=pool) == []

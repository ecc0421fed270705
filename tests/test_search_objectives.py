"""Objective normalisation on the source anchors, and hypervolume against a hand-written sweep."""
from __future__ import annotations

import pytest
import torch

from mergepipe.search.objectives import (REF_POINT, Anchors, TaskAnchor, hypervolume,
                                         hypervolume_trace, pareto_mask)


def test_sources_land_on_their_anchors_and_tasks_are_averaged():
    anchors = Anchors({"a": TaskAnchor(0.2, 0.8, 3.0, 30.0), "b": TaskAnchor(0.5, 0.7, 2.0, 10.0)})
    base = {"a": {"accuracy": 0.2, "mean_tokens": 3.0}, "b": {"accuracy": 0.5, "mean_tokens": 2.0}}
    reason = {"a": {"accuracy": 0.8, "mean_tokens": 30.0},
              "b": {"accuracy": 0.7, "mean_tokens": 10.0}}
    assert anchors.objectives(base) == pytest.approx((0.0, 1.0))
    assert anchors.objectives(reason) == pytest.approx((1.0, 0.0))
    mid = {"a": {"accuracy": 0.5, "mean_tokens": 16.5}, "b": {"accuracy": 0.7, "mean_tokens": 2.0}}
    assert anchors.objectives(mid) == pytest.approx(((0.5 + 1.0) / 2, (0.5 + 1.0) / 2))
    assert Anchors.from_json(anchors.to_json()) == anchors


def _sweep_hypervolume(Y: list[list[float]], ref: tuple[float, float]) -> float:
    """2-D hypervolume written out independently: sweep by f_acc descending, add the
    rectangle each point adds above the best f_cost seen so far."""
    area, best_cost = 0.0, ref[1]
    for acc, cost in sorted((p for p in Y if p[0] > ref[0] and p[1] > ref[1]), reverse=True):
        if cost > best_cost:
            area += (acc - ref[0]) * (cost - best_cost)
            best_cost = cost
    return area


def test_hypervolume_matches_an_independent_sweep():
    torch.manual_seed(0)
    Y = (torch.rand(25, 2, dtype=torch.double) * 1.4 - 0.3).tolist()
    expected = _sweep_hypervolume(Y, REF_POINT)
    assert expected > 0.5   # a real front, not a handful of points near the reference
    # 25 products summed in a different order: a few ulps apart at most
    assert hypervolume(Y) == pytest.approx(expected, rel=1e-12)


def test_hypervolume_by_hand_and_failed_points_add_nothing():
    # two rectangles from (-0.2, -0.2): (0, 1) and (1, 0) → 0.2·1.2 + 1.2·0.2 + 0.2·0.2 … by hand
    Y = [[0.0, 1.0], [1.0, 0.0]]
    by_hand = 1.2 * 0.2 + 0.2 * 1.0  # union of [−.2,0]×[−.2,1] and [0,1]×[−.2,0]
    assert hypervolume(Y) == pytest.approx(by_hand)
    assert hypervolume(Y + [list(REF_POINT)]) == pytest.approx(by_hand)
    assert hypervolume([]) == 0.0
    trace = hypervolume_trace([[0.0, 1.0], [0.5, 0.5], [0.4, 0.4]])
    assert trace[0] < trace[1] == pytest.approx(trace[2])


def test_pareto_mask_keeps_only_non_dominated():
    mask = pareto_mask([[0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]])
    assert mask.tolist() == [True, True, False, True]

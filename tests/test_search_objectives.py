"""Objective normalisation on the source anchors, and hypervolume against BoTorch."""
from __future__ import annotations

import pytest
import torch
from botorch.utils.multi_objective.box_decompositions.dominated import \
    DominatedPartitioning

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


def test_hypervolume_matches_botorch_partitioning():
    torch.manual_seed(0)
    Y = torch.rand(25, 2, dtype=torch.double) * 1.4 - 0.3
    ref = torch.tensor(REF_POINT, dtype=torch.double)
    expected = DominatedPartitioning(ref_point=ref, Y=Y).compute_hypervolume().item()
    assert hypervolume(Y) == pytest.approx(expected, rel=1e-9)


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

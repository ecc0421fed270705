"""Gap-aware rerank: pick a batch from a pool of acquisition optima.

The acquisition alone tends to pile candidates where the front is already
dense, and a free worker proposing next to a busy one wastes an evaluation.
The rerank adds a reward for predicted outcomes near the midpoints of large
gaps in the current Pareto front and a penalty for closeness (in decision
space) to in-flight or already-chosen candidates, then picks greedily.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

GAP_WEIGHT = 0.25
PROXIMITY_WEIGHT = 0.15
PROXIMITY_RATE = 4.0
DUPLICATE_TOL = 1e-2


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise distance scaled by √d, so it lies in [0, 1] for points in the unit cube."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.double)
    return torch.cdist(a.double(), b.double()) / math.sqrt(a.shape[-1])


def unseen(points: Sequence[Sequence[float]], taken: Sequence[Sequence[float]],
           tol: float = DUPLICATE_TOL) -> list[list[float]]:
    """``points`` less those within ``tol`` of ``taken`` or of an earlier kept one.

    Every path that hands out points filters through this: a batch computed on a
    snapshot may repeat what was handed out while it ran, and a design or a
    fill-up may land on a point in flight.
    """
    out: list[list[float]] = []
    seen = [[float(v) for v in t] for t in taken]
    for x in points:
        x = [float(v) for v in x]
        if seen and float(rms_distance(torch.tensor([x], dtype=torch.double),
                                       torch.tensor(seen, dtype=torch.double)).min()) < tol:
            continue
        out.append(x)
        seen.append(x)
    return out


def front_gaps(front: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints and lengths of the gaps at or above the median between neighbours."""
    if front.shape[0] < 2:
        return torch.zeros(0, 2, dtype=torch.double), torch.zeros(0, dtype=torch.double)
    f = front.double()[torch.argsort(front[:, 0])]
    lengths = (f[1:] - f[:-1]).norm(dim=-1)
    mids = (f[1:] + f[:-1]) / 2
    keep = (lengths >= lengths.median()) & (lengths > 0)
    return mids[keep], lengths[keep]


def gap_reward(means: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
    """In [0, 1]: high when a predicted outcome lands near the middle of a large gap."""
    mids, lengths = front_gaps(front)
    if mids.shape[0] == 0:
        return torch.zeros(means.shape[0], dtype=torch.double)
    d2 = torch.cdist(means.double(), mids) ** 2                # (n, gaps)
    width = (lengths / 2).clamp_min(1e-6)
    reward = (lengths / lengths.max()) * torch.exp(-d2 / (2 * width ** 2))
    return reward.max(dim=-1).values


def _unit(scores: torch.Tensor) -> torch.Tensor:
    s = scores.double()
    finite = torch.isfinite(s)
    if not finite.any():
        return torch.zeros_like(s)
    lo, hi = s[finite].min(), s[finite].max()
    out = (s - lo) / (hi - lo) if float(hi - lo) > 1e-12 else torch.ones_like(s)
    return torch.where(finite, out, torch.zeros_like(s))


def rerank(pool: torch.Tensor, scores: torch.Tensor, means: torch.Tensor, front: torch.Tensor,
           pending: torch.Tensor, batch: int, gap_weight: float = GAP_WEIGHT,
           proximity_weight: float = PROXIMITY_WEIGHT, tol: float = DUPLICATE_TOL,
           evaluated: torch.Tensor | None = None) -> list[int]:
    """Indices into ``pool`` of up to ``batch`` picks, best first.

    ``scores`` are each candidate's own acquisition values (rescaled to [0, 1]
    within the pool); ``means`` the GP-predicted objectives. Candidates within
    ``tol`` of a pending, chosen or ``evaluated`` point are never picked (an
    evaluation is deterministic: a repeat learns nothing), so fewer than
    ``batch`` indices may come back. Only pending and chosen points repel their
    neighbours: refining next to a finished point is often what pays.
    """
    base = _unit(scores) + gap_weight * gap_reward(means, front)
    if evaluated is not None and evaluated.shape[0]:
        seen = rms_distance(pool, evaluated.double().reshape(-1, pool.shape[-1]))
        base = torch.where(seen.min(dim=-1).values < tol, -float("inf"), base)
    taken = pending.double().reshape(-1, pool.shape[-1])
    chosen: list[int] = []
    for _ in range(batch):
        dist = rms_distance(pool, taken)
        if dist.shape[1]:
            near = dist.min(dim=-1).values
            penalty = torch.exp(-PROXIMITY_RATE * dist).max(dim=-1).values
        else:
            near = torch.full((pool.shape[0],), float("inf"), dtype=torch.double)
            penalty = torch.zeros(pool.shape[0], dtype=torch.double)
        total = base - proximity_weight * penalty
        total[near < tol] = -float("inf")
        if chosen:
            total[chosen] = -float("inf")
        best = int(torch.argmax(total))
        if not math.isfinite(float(total[best])):
            break
        chosen.append(best)
        taken = torch.cat([taken, pool[best:best + 1].double()])
    return chosen

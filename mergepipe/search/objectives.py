"""Objectives anchored on the two source models, and the hypervolume that scores a front.

Accuracy and generated-token cost live on different scales and differ per
task; anchoring each task on the base and the reasoning model puts every
candidate on one map where base ≈ (0, 1) and reasoning ≈ (1, 0), both maximised.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from botorch.utils.multi_objective.hypervolume import Hypervolume
from botorch.utils.multi_objective.pareto import is_non_dominated

REF_POINT: tuple[float, float] = (-0.2, -0.2)
_EPS = 1e-9


@dataclass(frozen=True)
class TaskAnchor:
    """The two source models' accuracy and mean generated tokens on one task."""

    acc_base: float
    acc_reason: float
    tok_base: float
    tok_reason: float

    def normalise(self, accuracy: float, mean_tokens: float) -> tuple[float, float]:
        """(accuracy gain, token saving), each 0 at one source and 1 at the other."""
        return (_ratio(accuracy - self.acc_base, self.acc_reason - self.acc_base),
                _ratio(mean_tokens - self.tok_reason, self.tok_base - self.tok_reason))


def _ratio(num: float, den: float) -> float:
    # Sources that tie on a task carry no signal for it; keep the raw gap.
    return num / den if abs(den) > _EPS else num


@dataclass(frozen=True)
class Anchors:
    """Per-task anchors; objectives are the mean over tasks."""

    tasks: Mapping[str, TaskAnchor]

    def objectives(self, metrics: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
        """``metrics[task] = {"accuracy", "mean_tokens"}`` → (f_acc, f_cost)."""
        pairs = [self.tasks[t].normalise(m["accuracy"], m["mean_tokens"])
                 for t, m in metrics.items()]
        if not pairs:
            raise ValueError("no task metrics to score")
        return (sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs))

    def source_points(self) -> list[tuple[float, float]]:
        """Where the base and the reasoning model themselves sit (the front's two ends)."""
        base = {t: {"accuracy": a.acc_base, "mean_tokens": a.tok_base}
                for t, a in self.tasks.items()}
        reason = {t: {"accuracy": a.acc_reason, "mean_tokens": a.tok_reason}
                  for t, a in self.tasks.items()}
        return [self.objectives(base), self.objectives(reason)]

    def to_json(self) -> dict[str, dict[str, float]]:
        return {t: asdict(a) for t, a in self.tasks.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, float]]) -> "Anchors":
        return cls({t: TaskAnchor(**v) for t, v in data.items()})


def as_tensor(Y: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(Y, dtype=torch.double)
    return t.reshape(-1, 2) if t.numel() else torch.zeros(0, 2, dtype=torch.double)


def pareto_mask(Y: Sequence[Sequence[float]] | torch.Tensor) -> torch.Tensor:
    """Boolean mask of non-dominated rows (maximisation)."""
    t = as_tensor(Y)
    if t.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return is_non_dominated(t, deduplicate=False)


def hypervolume(Y: Sequence[Sequence[float]] | torch.Tensor,
                ref: Sequence[float] = REF_POINT) -> float:
    """Hypervolume dominated by ``Y`` above ``ref`` (points not above ref add nothing)."""
    t = as_tensor(Y)
    ref_t = torch.tensor(list(ref), dtype=torch.double)
    if t.shape[0] == 0:
        return 0.0
    t = t[(t > ref_t).all(dim=-1)]
    if t.shape[0] == 0:
        return 0.0
    return float(Hypervolume(ref_point=ref_t).compute(t[is_non_dominated(t)]))


def hypervolume_trace(Y: Sequence[Sequence[float]] | torch.Tensor,
                      ref: Sequence[float] = REF_POINT) -> list[float]:
    """Hypervolume after each successive point (for hypervolume-over-time plots)."""
    t = as_tensor(Y)
    return [hypervolume(t[: i + 1], ref) for i in range(t.shape[0])]

"""The work a search sends to an evaluator: merge a plan (optional) and score the model.

Jobs are plain picklable dataclasses holding everything they need (the plan is
self-contained), so they run unchanged in a local process or a Ray actor.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass
class TaskRef:
    """An evaluation task: a name for the catalog and the JSONL file it reads."""

    name: str
    path: str
    limit: int | None = None
    max_new_tokens: int | None = None


def score_dir(model_dir: str, tasks: list[TaskRef], device: str, backend: str,
              slot: int | None, stretch: float) -> dict[str, Any]:
    """Load ``model_dir`` once and score the units of ``tasks`` this job claims."""
    from mergepipe.evaluate.runner import load_backend
    from mergepipe.search.sharing import score_units
    engine = load_backend(backend, model_dir, device=device)
    return score_units(engine, tasks, slot, stretch)


def stretch_factor(seed: int, trial: int, alpha: float | None, cap: float = 20.0) -> float:
    """A Pareto(α) multiplier (≥ 1), reproducible per (seed, trial)."""
    if not alpha:
        return 1.0
    u = random.Random(seed * 1_000_003 + trial).random()
    return min(cap, (1.0 - u) ** (-1.0 / alpha))


@dataclass
class EvaluateJob:
    """Score an existing model directory (the two anchors, or a reused commit).

    ``slot`` names the trial's shared unit counter (:mod:`mergepipe.search.sharing`);
    a ``helper`` copy of the job scores units its owner has not claimed yet.
    """

    model_dir: str
    tasks: list[TaskRef]
    device: str = "cpu"
    stretch: float = 1.0
    backend: str = "transformers"
    slot: int | None = None
    helper: bool = False

    def run(self) -> dict[str, Any]:
        from mergepipe.search.sharing import has_work, nothing_left
        if self.helper and not has_work(self.slot):
            return nothing_left()
        value = score_dir(self.model_dir, self.tasks, self.device, self.backend, self.slot,
                          self.stretch)
        return {**value, "report": None}


@dataclass
class MergeEvaluateJob:
    """Execute a plan into its staging directory, then score what was written there.

    A ``helper`` copy only scores: its owner has written the staging directory
    before any unit can be left for others.
    """

    plan: Any
    staging: str
    tasks: list[TaskRef]
    device: str = "cpu"
    stretch: float = 1.0
    backend: str = "transformers"
    slot: int | None = None
    helper: bool = False

    def run(self) -> dict[str, Any]:
        from mergepipe.engine.execute import execute_plan
        from mergepipe.search.sharing import has_work, nothing_left
        if self.helper and not has_work(self.slot):
            return nothing_left()
        report = None if self.helper else execute_plan(self.plan, self.staging, device=self.device)
        value = score_dir(self.staging, self.tasks, self.device, self.backend, self.slot,
                          self.stretch)
        return {**value, "report": report}

"""The work a search sends to an evaluator: merge a plan (optional) and score the model.

Jobs are plain picklable dataclasses holding everything they need (the plan is
self-contained), so they run unchanged in a local process or a Ray actor.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class TaskRef:
    """An evaluation task: a name for the catalog and the JSONL file it reads."""

    name: str
    path: str
    limit: int | None = None
    max_new_tokens: int | None = None


def evaluate_dir(model_dir: str, tasks: list[TaskRef], device: str,
                 backend: str = "transformers") -> dict[str, dict[str, float]]:
    """Accuracy and mean generated tokens of ``model_dir`` on each task."""
    from mergepipe.evaluate import evaluate_model
    out = {}
    for t in tasks:
        kwargs: dict[str, Any] = {"limit": t.limit, "device": device, "backend": backend}
        if t.max_new_tokens:
            kwargs["max_new_tokens"] = t.max_new_tokens
        res = evaluate_model(model_dir, t.path, **kwargs)
        out[t.name] = {"accuracy": float(res.accuracy), "mean_tokens": float(res.mean_tokens),
                       "n": int(res.n), "wall_s": float(getattr(res, "wall_s", 0.0) or 0.0),
                       "backend": str(getattr(res, "backend", "transformers"))}
    return out


def stretch_factor(seed: int, trial: int, alpha: float | None, cap: float = 20.0) -> float:
    """A Pareto(α) multiplier (≥ 1), reproducible per (seed, trial)."""
    if not alpha:
        return 1.0
    u = random.Random(seed * 1_000_003 + trial).random()
    return min(cap, (1.0 - u) ** (-1.0 / alpha))


@dataclass
class EvaluateJob:
    """Score an existing model directory (the two anchors, or a reused commit)."""

    model_dir: str
    tasks: list[TaskRef]
    device: str = "cpu"
    stretch: float = 1.0
    backend: str = "transformers"

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        metrics = evaluate_dir(self.model_dir, self.tasks, self.device, self.backend)
        _stretch(time.time() - t0, self.stretch)
        return {"metrics": metrics, "report": None}


@dataclass
class MergeEvaluateJob:
    """Execute a plan into its staging directory, then score what was written there."""

    plan: Any
    staging: str
    tasks: list[TaskRef]
    device: str = "cpu"
    stretch: float = 1.0
    backend: str = "transformers"

    def run(self) -> dict[str, Any]:
        from mergepipe.engine.execute import execute_plan
        t0 = time.time()
        report = execute_plan(self.plan, self.staging, device=self.device)
        metrics = evaluate_dir(self.staging, self.tasks, self.device, self.backend)
        _stretch(time.time() - t0, self.stretch)
        return {"metrics": metrics, "report": report}


def _stretch(elapsed: float, factor: float) -> None:
    """Emulate a slower evaluator: wait (factor − 1) × the real time taken."""
    if factor > 1.0:
        time.sleep((factor - 1.0) * elapsed)

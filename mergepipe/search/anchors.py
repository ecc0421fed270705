"""Evaluate the two source models once per task and keep the result as the search's anchors.

Evaluations already in the catalog for the same task file and problem count
are reused, so a bench of many searches scores each source model only once.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from mergepipe.catalog.store import Catalog
from mergepipe.errors import MergePipeError
from mergepipe.search import trials
from mergepipe.search.config import SearchConfig
from mergepipe.search.jobs import EvaluateJob, TaskRef
from mergepipe.search.objectives import Anchors, TaskAnchor
from mergepipe.search.resident import ResidentEvaluateJob
from mergepipe.search.sharing import combine
from mergepipe.search.workers import WorkerPool


def task_refs(cfg: SearchConfig) -> list[TaskRef]:
    return [TaskRef(str(Path(t).resolve()), str(Path(t).resolve()), cfg.limit,
                    cfg.max_new_tokens) for t in cfg.tasks]


def expected_n(task: TaskRef) -> int:
    with open(task.path) as f:
        n = sum(1 for line in f if line.strip())
    return min(n, task.limit) if task.limit else n


def _cached(cat: Catalog, model_id: str, tasks: list[TaskRef]) -> dict[str, dict[str, Any]] | None:
    out = {}
    for t in tasks:
        ev = cat.latest_evaluation(model_id, t.name)
        if not ev or "accuracy" not in ev or "mean_tokens" not in ev or ev["n"] != expected_n(t):
            return None
        out[t.name] = ev
    return out


def evaluate_sources(cat: Catalog, models: list[dict[str, Any]], tasks: list[TaskRef],
                     device: str, pool: WorkerPool, backend: str = "transformers",
                     engine_dir: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{model_id: {task: metrics}}``, evaluating in parallel only what is not cached.

    With ``engine_dir`` (resident evaluators) each source is loaded into the
    worker's live engine, started from ``engine_dir``, instead of a new one."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    todo = []
    for m in models:
        cached = _cached(cat, m["model_id"], tasks)
        if cached is None:
            todo.append(m)
        else:
            results[m["model_id"]] = cached
    waiting: dict[int, dict[str, Any]] = {}
    while todo or waiting:
        for worker in pool.free():
            if not todo:
                break
            m = todo.pop(0)
            key = -1 - len(results) - len(waiting)   # negative ids never clash with trials
            waiting[key] = m
            job: Any = EvaluateJob(m["path"], tasks, device, backend=backend) \
                if engine_dir is None else \
                ResidentEvaluateJob(m["path"], engine_dir, tasks, device, backend)
            pool.submit(worker, key, job)
        for r in pool.wait(timeout=None):
            m = waiting.pop(r.trial)
            if not r.ok:
                raise MergePipeError(f"evaluating source model {m['name']} failed: "
                                     f"{(r.error or '').splitlines()[0]}")
            metrics = combine([r.value], tasks)
            for task, met in metrics.items():
                cat.record_evaluation(m["model_id"], task, {
                    "accuracy": met["accuracy"], "mean_tokens": met["mean_tokens"]},
                    n=met["n"], backend=met["backend"], split="test", wall_s=met["wall_s"])
            results[m["model_id"]] = metrics
    return results


def ensure_anchors(cat: Catalog, search_id: str, row: dict[str, Any], base: dict[str, Any],
                   reasoning: dict[str, Any], tasks: list[TaskRef], device: str,
                   pool: WorkerPool, backend: str = "transformers",
                   engine_dir: str | None = None) -> Anchors:
    if row.get("anchors"):
        return Anchors.from_json(row["anchors"]["tasks"])
    ev = evaluate_sources(cat, [base, reasoning], tasks, device, pool, backend, engine_dir)
    b, r = ev[base["model_id"]], ev[reasoning["model_id"]]
    anchors = Anchors({t.name: TaskAnchor(b[t.name]["accuracy"], r[t.name]["accuracy"],
                                          b[t.name]["mean_tokens"], r[t.name]["mean_tokens"])
                       for t in tasks})
    inverted = [t for t, a in anchors.tasks.items() if a.acc_reason <= a.acc_base]
    if inverted:
        # The anchored accuracy objective assumes the reasoning model is the more accurate
        # one; otherwise maximising it rewards merges that lose accuracy. Say so loudly.
        warnings.warn(f"reasoning model is not more accurate than the base on "
                      f"{', '.join(inverted)}: the normalised accuracy objective is inverted "
                      f"there (evaluate more problems or check the sources)", stacklevel=2)
    trials.update_search(cat, search_id, anchors={
        "tasks": anchors.to_json(), "inverted_tasks": inverted,
        "models": {"base": base["model_id"], "reasoning": reasoning["model_id"]}})
    return anchors

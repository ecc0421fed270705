"""Per-layer and per-model summaries of a plan (and of a run against its plan)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from mergepipe.planner.plan import Plan


def layer_label(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def explain_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per (layer, source): bytes to read and bytes skipped."""
    acc: dict[tuple[Any, str], dict[str, Any]] = defaultdict(
        lambda: {"tensors": 0, "read": 0, "skipped": 0})
    for t in plan.tasks:
        reads = ([t.base] if t.base else []) + t.inputs
        for r in reads:
            key = (t.layer, plan.sources[r.src].key)
            row_bytes = r.nbytes // t.rows if t.rows else 0
            n = r.bytes_to_read(row_bytes)
            acc[key]["tensors"] += 1
            acc[key]["read"] += n
            acc[key]["skipped"] += r.nbytes - n
        for name in t.skipped:
            src = next(s for s in plan.sources if s.key == name)
            acc[(t.layer, src.key)]["tensors"] += 1
            acc[(t.layer, src.key)]["skipped"] += t.base.nbytes if t.base else 0
    rows = []
    for (layer, src), v in sorted(acc.items(), key=lambda kv: (
            kv[0][0] if kv[0][0] is not None else -1, kv[0][1])):
        role = next(s.role for s in plan.sources if s.key == src)
        rows.append({"layer": layer_label(layer), "model": src, "role": role, **v})
    return rows


def summary(plan: Plan) -> dict[str, Any]:
    est = plan.est_bytes()
    return {
        "plan_id": plan.plan_id,
        "method": plan.method,
        "sources": [{"name": s.key, "role": s.role} for s in plan.sources],
        "tensors": len(plan.tasks),
        "shards": plan.shards,
        "est_bytes": {"base": est["base"], "experts": est["experts"], "out": est["out"]},
        "full_expert_bytes": plan.full_expert_bytes(),
        "io_budget": plan.io_budget,
        "error_bound": plan.error_bound,
        "error_bound_kind": plan.error_bound_kind,
        "seed": plan.seed,
    }

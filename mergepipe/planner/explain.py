"""Per-layer and per-model summaries of a plan (and of a run against its plan)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from mergepipe.planner.plan import Plan
from mergepipe.text import human_bytes


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
            n = r.bytes_to_read(t.row_bytes(r))
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


def summary_lines(plan: Plan) -> list[str]:
    """The plan summary as a person reads it: what is merged, read and written."""
    s = summary(plan)
    srcs = ", ".join(f"{x['name']}:{x['role']}" for x in s["sources"])
    e = s["est_bytes"]
    lines = [f"plan {plan.plan_id}",
             f"  method     {s['method']}  ({srcs})",
             f"  tensors    {s['tensors']} in {len(s['shards'])} shard(s)",
             f"  reads      base {human_bytes(e['base'])}, experts {human_bytes(e['experts'])} "
             f"of {human_bytes(s['full_expert_bytes'])}",
             f"  writes     {human_bytes(e['out'])}"]
    if s["io_budget"] is not None:
        lines.append(f"  budget     {human_bytes(s['io_budget'])}; error bound "
                     f"{s['error_bound']:.4g} ({s['error_bound_kind']})")
    return lines


def run_lines(plan: Plan, run: dict[str, Any], phases: dict[str, float]) -> list[str]:
    """A run against its plan: realised reads beside the estimates, time, memory and
    where the engine's seconds went (``phases``, from the run's manifest)."""
    est = plan.est_bytes()
    lines = [f"run {run['run_id']} {run['status']}: read base "
             f"{human_bytes(run['bytes_read_base'])} (est {human_bytes(est['base'])}), experts "
             f"{human_bytes(run['bytes_read_experts'])} (est {human_bytes(est['experts'])}), "
             f"wrote {human_bytes(run['bytes_written'])}, {run['wall_s'] or 0:.2f} s, "
             f"peak RSS {human_bytes(run['peak_rss'])}"]
    if phases:  # seconds per engine phase (floats), and counts such as threads (ints)
        lines.append("engine phases: " + ", ".join(
            f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}" for k, v in phases.items()))
    return lines

"""What `explain` adds for budgeted plans and runs: who was read, what was kept, how far off.

Everything is recomputed from the stored plan and the catalog's block
statistics, so an old plan explains the same way it planned; if the stats were
invalidated since (a model changed), it says so instead of guessing.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from mergepipe.catalog.stats import load_block_stats
from mergepipe.catalog.store import Catalog
from mergepipe.planner.bound import input_shares
from mergepipe.planner.cost import fit_cost_model
from mergepipe.planner.explain import layer_label
from mergepipe.planner.plan import Plan
from mergepipe.text import format_rows, human_bytes


def _time_lines(cat: Catalog, plan: Plan, run: dict[str, Any] | None) -> list[str]:
    model = fit_cost_model(cat)
    if model is None:
        return ["time estimate: no committed runs in this catalog to calibrate the cost model yet"]
    est = model.predict_plan(plan)
    rate = f"{human_bytes(1 / model.s_read)}/s read" if model.s_read > 0 else "read cost ~0"
    line = f"time estimate {est:.2f} s (cost model from {model.runs} past run(s): {rate})"
    if run and run.get("wall_s") is not None:
        line += f"; this run took {run['wall_s']:.2f} s"
    return [line]


def budget_rows(cat: Catalog, plan: Plan) -> tuple[list[dict[str, Any]], dict[Any, float]] | None:
    """Rows per (layer, expert) and each layer's bound; None when stats are gone."""
    b = plan.base_source()
    if b is None:
        return None
    experts = sorted({s.model_id for s in plan.sources if s.role == "expert"})
    stats = load_block_stats(cat, experts, plan.sources[b].model_id)
    if not stats:
        return None
    shares, bounds = input_shares(plan, stats)
    acc: dict[tuple[Any, str], dict[str, float]] = defaultdict(
        lambda: {"read": 0, "skipped": 0, "energy": 0.0, "kept": 0.0, "omit_sq": 0.0})
    for s in shares:
        a = acc[(s.layer, plan.sources[s.src].key)]
        a["read"] += s.read
        a["skipped"] += s.skipped
        a["energy"] += s.energy
        a["kept"] += s.energy_kept
        a["omit_sq"] += s.omitted_norm ** 2
    layer_bound: dict[Any, float] = defaultdict(float)
    for t, bound in zip(plan.tasks, bounds):
        layer_bound[t.layer] += bound * bound
    rows = []
    for (layer, key), a in sorted(acc.items(), key=lambda kv: (
            kv[0][0] if kv[0][0] is not None else -1, kv[0][1])):
        rows.append({"layer": layer_label(layer), "expert": key, "read": int(a["read"]),
                     "skipped": int(a["skipped"]),
                     "energy_kept": a["kept"] / a["energy"] if a["energy"] > 0 else 1.0,
                     "omitted_norm": math.sqrt(a["omit_sq"]),
                     "layer_bound": math.sqrt(layer_bound[layer])})
    return rows, {k: math.sqrt(v) for k, v in layer_bound.items()}


def report_lines(cat: Catalog, plan: Plan, run: dict[str, Any] | None) -> list[str]:
    lines = _time_lines(cat, plan, run)
    if plan.io_budget is None:
        return lines
    full = plan.full_expert_bytes()
    est = plan.est_bytes()["experts"]
    pct = 100.0 * plan.io_budget / full if full else 100.0
    lines.append(f"budget {human_bytes(plan.io_budget)} = {pct:.1f}% of full expert reads "
                 f"({human_bytes(full)}); plan reads {human_bytes(est)}; error bound "
                 f"{plan.error_bound:.4g} ({plan.error_bound_kind}, Frobenius over the model)")
    if run and run.get("bytes_read_experts") is not None:
        real = run["bytes_read_experts"]
        held = "within" if real <= plan.io_budget else "OVER"
        ratio = f"{real / est:.3f}× the estimate" if est else "estimate 0"
        lines.append(f"realised expert reads {human_bytes(real)} ({ratio}), {held} the budget")
    got = budget_rows(cat, plan)
    if got is None:
        lines.append("block statistics for this plan are gone (a model changed); "
                     "per-block shares unavailable")
        return lines
    rows, _ = got
    for r in rows:
        r["read"], r["skipped"] = human_bytes(r["read"]), human_bytes(r["skipped"])
        r["energy_kept"] = f"{100 * r['energy_kept']:.1f}%"
    lines.append(format_rows(rows, "table"))
    return lines

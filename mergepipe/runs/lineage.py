"""Lineage rows a commit records: one edge per parent, and the parameters each
parent was merged with, layer by layer.

The per-layer rows come from the plan's resolved per-tensor parameters, so they
hold the numbers the engine used (a gradient ``[0.2, 0.6]`` over four layers is
0.2, 0.333…, 0.466…, 0.6), not the spec's shorthand nor an average.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mergepipe.catalog.names import LAYER_PATTERN
from mergepipe.planner.plan import Plan, TensorTask
from mergepipe.planner.spec import parse_spec


def lineage_rows(plan: Plan, child_id: str, run_id: str) -> list[dict[str, Any]]:
    """One edge per parent, with the mean weight over tensors as a summary
    (``lineage_view`` shows the exact weight, or how it varies, from the layer rows)."""
    sums: dict[str, list[float]] = {}
    for t in plan.tasks:
        for key, w in zip(t.input_keys, t.params.get("weight", [])):
            sums.setdefault(key, []).append(float(w))
        for key in t.skipped:
            sums.setdefault(key, []).append(0.0)
    spec_params = {m.ref: m.params or None for m in parse_spec(plan.spec).models} \
        if plan.spec.get("models") else {}
    rows = []
    for s in plan.sources:
        ws = sums.get(s.key)
        rows.append(dict(
            child_model_id=child_id, parent_model_id=s.model_id, role=s.role,
            weight=(math.fsum(ws) / len(ws)) if ws else None,
            params_json=json.dumps(_params_for(spec_params, s), default=str),
            plan_id=plan.plan_id, run_id=run_id))
    return rows


def _params_for(spec_params: dict[str, Any], source: Any) -> Any:
    for ref, params in spec_params.items():
        if ref == source.key or (ref and Path(ref).expanduser().resolve().as_posix() == source.path):
            return params
    return None


def task_settings(plan: Plan, task: TensorTask) -> list[tuple[str, dict[str, Any]]]:
    """(source key, every parameter applied to that source) for one output tensor.

    Per-model parameters are the lists aligned with ``input_keys``; the others are
    merge-wide and apply to every input and to the base. A skipped input had weight 0.
    """
    shared = {k: v for k, v in task.params.items() if not isinstance(v, list)}
    out = [(key, {**shared, **{k: v[i] for k, v in task.params.items() if isinstance(v, list)}})
           for i, key in enumerate(task.input_keys)]
    out += [(key, {**shared, "weight": 0.0}) for key in task.skipped]
    if task.base is not None:
        out.append((plan.sources[task.base.src].key, shared))
    return out


def layer_rows(plan: Plan, child_id: str, run_id: str) -> list[dict[str, Any]]:
    """One row per parent and output layer (layer NULL: embeddings, final norm, head).

    A layer whose tensors a filter gave different settings gets one row per
    setting, naming its tensors; tensors copied unmerged (non-float buffers) count
    for nobody.
    """
    sources = {s.key: s for s in plan.sources}
    groups: dict[tuple[str, int | None], dict[str, list[str]]] = {}
    for task in plan.tasks:
        if task.scope == "copy":
            continue
        m = LAYER_PATTERN.search(task.name) if task.layer is not None else None
        tensor = m.group("module") if m else task.name
        for key, params in task_settings(plan, task):
            settings = json.dumps(params, sort_keys=True, default=str)
            groups.setdefault((key, task.layer), {}).setdefault(settings, []).append(tensor)
    order = {s.key: i for i, s in enumerate(plan.sources)}
    rows = []
    for (key, layer), by_setting in sorted(groups.items(), key=lambda g: (
            order[g[0][0]], -1 if g[0][1] is None else g[0][1])):
        src = sources[key]
        for settings, tensors in sorted(by_setting.items(), key=lambda s: sorted(s[1])):
            params = json.loads(settings)
            rows.append(dict(
                child_model_id=child_id, parent_model_id=src.model_id, role=src.role,
                layer=layer, num_tensors=len(tensors),
                tensors=",".join(sorted(tensors)) if len(by_setting) > 1 else None,
                weight=_number(params.get("weight")), density=_number(params.get("density")),
                params_json=settings, plan_id=plan.plan_id, run_id=run_id))
    return rows


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

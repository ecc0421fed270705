"""Plans in the catalog: stored once under their content id, loaded by id or prefix."""
from __future__ import annotations

import json

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog, now
from mergepipe.errors import MergePipeError
from mergepipe.planner.plan import Plan


def store_plan(cat: Catalog, plan: Plan) -> bool:
    """Insert the plan if new; returns True when it was inserted."""
    t = schema.plans
    if cat.rows(sa.select(t.c.plan_id).where(t.c.plan_id == plan.plan_id)):
        return False
    est = plan.est_bytes()
    base = plan.base_source()
    cat.execute(t.insert().values(
        plan_id=plan.plan_id, method=plan.method,
        base_model_id=plan.sources[base].model_id if base is not None else None,
        spec_json=json.dumps(plan.spec, default=str), plan_blob=plan.to_blob(),
        io_budget=plan.io_budget, est_bytes_base=est["base"], est_bytes_experts=est["experts"],
        est_bytes_full_experts=plan.full_expert_bytes(), est_bytes_out=est["out"],
        error_bound=plan.error_bound, error_bound_kind=plan.error_bound_kind,
        created_at=now()))
    return True


def load_plan(cat: Catalog, plan_id: str) -> Plan:
    t = schema.plans
    rows = cat.rows(sa.select(t.c.plan_id, t.c.plan_blob).where(t.c.plan_id.like(f"{plan_id}%")))
    if not rows:
        raise MergePipeError(f"no plan with id {plan_id!r}")
    if len(rows) > 1:
        raise MergePipeError(f"plan id prefix {plan_id!r} is ambiguous")
    return Plan.from_blob(rows[0]["plan_blob"])

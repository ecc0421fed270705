"""Questions the catalog answers for people: which models exist, where a model came from."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog


def models(cat: Catalog) -> list[dict[str, Any]]:
    """Every registered and merged model, oldest first."""
    t = schema.models
    return cat.rows(sa.select(t.c.name, t.c.kind, t.c.architecture, t.c.num_layers,
                              t.c.num_params, t.c.total_bytes, t.c.path, t.c.created_at)
                    .order_by(t.c.created_at))


def find_run(cat: Catalog, run_id_prefix: str) -> dict[str, Any] | None:
    """The one run whose id starts with the prefix (None if none or several)."""
    runs = cat.rows(sa.select(schema.runs).where(
        schema.runs.c.run_id.like(f"{run_id_prefix}%")))
    return runs[0] if len(runs) == 1 else None


def lineage(cat: Catalog, name: str) -> list[dict[str, Any]]:
    """Every ancestry edge of a model, nearest first.

    A breadth-first walk that visits each model once, so it ends on any
    catalog, even one whose lineage loops (older versions could write that).
    ``weight`` and ``weights`` are ``lineage_view``'s: the weight where it is one
    number, else NULL and a range such as "0.2..0.6 by layer".
    """
    l, m, p = schema.lineage, schema.models, schema.plans
    child_m, parent_m = m.alias("c"), m.alias("p")
    start = cat.require_model(name)["model_id"]
    seen, frontier, depth, out = {start}, [start], 1, []
    while frontier:
        rows = cat.rows(
            sa.select(l.c.child_model_id, l.c.parent_model_id, child_m.c.name.label("child"),
                      parent_m.c.name.label("parent"), l.c.role, l.c.weight, p.c.method,
                      l.c.plan_id)
            .join(child_m, child_m.c.model_id == l.c.child_model_id)
            .join(parent_m, parent_m.c.model_id == l.c.parent_model_id)
            .join(p, p.c.plan_id == l.c.plan_id)
            .where(l.c.child_model_id.in_(frontier)))
        rows.sort(key=lambda r: (r["child"], r["role"] or "", r["parent"]))
        shown = _view_weights(cat, sorted({r["child"] for r in rows}))
        frontier = []
        for r in rows:
            weight, weights = shown.get((r["child"], r["parent"], r["role"]), (r["weight"], None))
            out.append({"depth": depth, "child": r["child"], "parent": r["parent"],
                        "role": r["role"], "weight": weight, "weights": weights,
                        "method": r["method"], "plan_id": r["plan_id"]})
            if r["parent_model_id"] not in seen:
                seen.add(r["parent_model_id"])
                frontier.append(r["parent_model_id"])
        depth += 1
    return out


def _view_weights(cat: Catalog, children: list[str]) -> dict[tuple[str, str, str], tuple]:
    """(weight, weights) of each edge of these children, as ``lineage_view`` shows them."""
    if not children:
        return {}
    q = sa.text("SELECT child, parent, role, weight, weights FROM lineage_view "
                "WHERE child IN :children").bindparams(sa.bindparam("children", expanding=True))
    return {(r["child"], r["parent"], r["role"]): (r["weight"], r["weights"])
            for r in cat.rows(q, {"children": children})}

"""The end product of a search: its Pareto set as committed models, and its plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog
from mergepipe.planner.records import load_plan
from mergepipe.runs.apply import apply_plan
from mergepipe.search import trials
from mergepipe.search.plots import hypervolume_plot, pareto_plot, series_from_trials
from mergepipe.search.report import finished_points, pareto_trials, source_points


def _lineage(cat: Catalog, model_id: str) -> list[dict[str, Any]]:
    lin, m = schema.lineage, schema.models
    return cat.rows(sa.select(m.c.name.label("parent"), lin.c.role, lin.c.weight, lin.c.plan_id,
                              lin.c.run_id)
                    .join(m, m.c.model_id == lin.c.parent_model_id)
                    .where(lin.c.child_model_id == model_id).order_by(lin.c.role))


def _evaluations(cat: Catalog, model_id: str) -> dict[str, dict[str, float]]:
    e = schema.evaluations
    out: dict[str, dict[str, float]] = {}
    for r in cat.rows(sa.select(e).where(e.c.model_id == model_id).order_by(e.c.created_at)):
        out.setdefault(r["task"], {})[r["metric"]] = r["value"]
    return out


def _model_of(cat: Catalog, trial: dict[str, Any]) -> dict[str, Any] | None:
    """The trial's committed model: its own, or (resident trials) a commit of its plan."""
    if trial["model_id"]:
        return cat.model_by_id(trial["model_id"])
    r = schema.runs
    rows = cat.rows(sa.select(r.c.model_id).where(
        r.c.plan_id == trial["plan_id"], r.c.status == "COMMITTED")
        .order_by(r.c.finished_at.desc()))
    return cat.model_by_id(rows[0]["model_id"]) if rows else None


def front_models(cat: Catalog, search_id: str, materialize: bool = False,
                 home: Path | None = None) -> list[dict[str, Any]]:
    """One row per Pareto-optimal trial: its model, lineage, evaluations and whereabouts.

    With ``materialize``, a front trial whose checkpoint is not on disk (collected,
    or never written because a resident evaluator scored it in memory) is written
    through the normal transactional apply of the trial's own plan.
    """
    s = trials.get_search(cat, search_id)
    out = []
    for t in pareto_trials(trials.list_trials(cat, s["search_id"]), source_points(s)):
        model = _model_of(cat, t)
        path = Path(model["path"]) if model else None
        if materialize and not (path and path.exists()):
            plan = load_plan(cat, t["plan_id"])
            if path is None:
                from mergepipe.search.config import SearchConfig
                from mergepipe.search.coordinator import search_root
                root = search_root(Path(home or "."), s["search_id"],
                                   SearchConfig.from_dict(s["config"]))
                path = root / f"t{t['trial']:04d}"
            name = (model["name"] + "-m" if model
                    else f"search-{s['search_id'][:8]}-t{t['trial']:03d}")
            res = apply_plan(cat, plan, path, name=name, overwrite=True)
            model = cat.model_by_id(res.model_id)
            path = Path(model["path"])
        lineage = _lineage(cat, model["model_id"]) if model else []
        weight = next((l["weight"] for l in lineage if l["role"] != "base"), None)
        out.append({"trial": t["trial"], "model": model["name"] if model else None,
                    "model_id": model["model_id"] if model else None, "plan_id": t["plan_id"],
                    "f_acc": t["f_acc"], "f_cost": t["f_cost"], "accuracy": t["accuracy"],
                    "mean_tokens": t["mean_tokens"], "x": t["x"], "weight": weight,
                    "path": str(path) if path else None,
                    "on_disk": bool(path and path.exists()), "lineage": lineage,
                    "evaluations": _evaluations(cat, model["model_id"]) if model else {}})
    return out


def write_plots(cat: Catalog, search_id: str, pareto_png: str | None,
                hv_png: str | None) -> None:
    s = trials.get_search(cat, search_id)
    rows = trials.list_trials(cat, s["search_id"])
    pts = finished_points(rows)
    title = f"{s['algorithm']} · search {s['search_id'][:8]} · {len(pts)} trials"
    if pareto_png:
        on_front = pareto_trials(rows, source_points(s))
        front = [[t["f_acc"], t["f_cost"]] for t in on_front]
        pareto_plot([[r["f_acc"], r["f_cost"]] for r in pts], front, pareto_png, title,
                    labels=[f"t{t['trial']}" for t in on_front])
    if hv_png:
        hypervolume_plot({s["algorithm"]: series_from_trials(pts)}, hv_png, title)

"""A merge as one all-or-nothing job: plan (analyzing what a budget needs), begin a
run, execute the plan in the engine, commit — or leave the catalog as it was.

The library façade (:mod:`mergepipe.api`), the search coordinator and the CLI
all go through these functions.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mergepipe.catalog import schema
from mergepipe.catalog.stats import missing_stats
from mergepipe.catalog.store import Catalog
from mergepipe.engine.execute import DEFAULT_BLOCK_BYTES, execute_plan
from mergepipe.planner.budget import apply_budget, budget_models, resolve_budget
from mergepipe.planner.exact import build_exact_plan
from mergepipe.planner.plan import Plan
from mergepipe.planner.records import store_plan
from mergepipe.runs.analyze import analyze
from mergepipe.runs.reuse import NotReusable, reuse_commit
from mergepipe.runs.transaction import (ApplyResult, abort_run, begin_run,
                                        commit_run, committed_result)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plan_merge(cat: Catalog, spec: str | Path | dict[str, Any],
               io_budget: str | int | None = None, seed: int | None = None,
               analyze_missing: bool = True, progress: bool = False) -> Plan:
    """An exact plan, or one under an expert I/O budget, not yet stored.

    A budget needs block statistics of each expert against the base; missing
    ones are computed by an analyze run first (unless ``analyze_missing`` is off,
    when planning fails naming the command that computes them).
    """
    plan = build_exact_plan(cat, spec, seed=seed)
    if io_budget is None:
        return plan
    base, experts = budget_models(cat, plan)
    resolve_budget(io_budget, plan.full_expert_bytes())  # a bad budget fails before analyzing
    missing = missing_stats(cat, experts, base)
    if missing and analyze_missing:
        analyze(cat, missing, base, progress=progress, refresh=False, notify=_stderr)
    return apply_budget(cat, plan, io_budget)


def build_plan(cat: Catalog, spec: str | Path | dict[str, Any],
               io_budget: str | int | None = None, seed: int | None = None,
               analyze: bool = True, progress: bool = False, store: bool = True) -> Plan:
    """Plan a merge and store the plan (all-or-nothing: a spec that fails to plan
    leaves no trace, not even the models its paths would have registered)."""
    plan, _ = build_and_store(cat, spec, io_budget, seed, analyze, progress, store)
    return plan


def build_and_store(cat: Catalog, spec: str | Path | dict[str, Any],
                    io_budget: str | int | None = None, seed: int | None = None,
                    analyze: bool = True, progress: bool = False,
                    store: bool = True) -> tuple[Plan, bool]:
    """:func:`build_plan`, also saying whether this call inserted the plan row
    (a run that then fails removes a plan it inserted)."""
    before = list(cat.fresh_models)
    try:
        plan = plan_merge(cat, spec, io_budget, seed, analyze, progress)
        inserted = store_plan(cat, plan) if store else False
    except BaseException:
        forget_fresh_models(cat, before)
        raise
    return plan, inserted


def forget_fresh_models(cat: Catalog, keep: list[str]) -> None:
    """Unregister the models this handle registered on the fly, except ``keep``."""
    for model_id in [m for m in cat.fresh_models if m not in keep]:
        cat.delete_model(model_id)
        cat.fresh_models.remove(model_id)


def apply_plan(cat: Catalog, plan: Plan, out: str | Path, name: str | None = None,
               overwrite: bool = False, device: str = "cpu", allow_nonfinite: bool = False,
               block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False,
               plan_inserted: bool = False) -> ApplyResult:
    """Execute a plan transactionally.

    A plan already committed at ``out`` returns that commit (``reused``, nothing
    written); one committed elsewhere is materialised at ``out`` from that
    commit's files (``reused``, hard links where possible), or merged again
    when those files no longer verify.
    ``plan_inserted``: the caller stored the plan just now, so a failed run
    removes it again along with the run.
    """
    existing = committed_result(cat, plan, out)
    if existing is not None:
        if Path(existing.out) == Path(out).expanduser().resolve():
            return existing
        try:
            return reuse_commit(cat, plan, existing, out, name, overwrite, device)
        except NotReusable as exc:
            _stderr(f"note: {exc}; merging from the inputs instead")
        except BaseException:
            forget_fresh_models(cat, [])
            raise
    try:
        ticket = begin_run(cat, plan, out, overwrite=overwrite, plan_inserted=plan_inserted,
                           device=device, name=name or Path(out).expanduser().resolve().name)
    except BaseException:
        if plan_inserted:
            cat.execute(schema.plans.delete().where(schema.plans.c.plan_id == plan.plan_id))
        forget_fresh_models(cat, [])
        raise
    try:
        report = execute_plan(plan, ticket.staging, device=device, block_bytes=block_bytes,
                              allow_nonfinite=allow_nonfinite, progress=progress)
        return commit_run(cat, plan, ticket, report, name)
    except BaseException as exc:
        abort_run(cat, ticket)
        forget_fresh_models(cat, [])
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = ticket.out  # a failed write names no file; say where it went
        raise


"""The library façade: the same calls the CLI and search loops use.

    from mergepipe import api
    with api.open_catalog("./ws") as cat:
        plan = api.build_plan(cat, "ties.yml")
        result = api.apply_plan(cat, plan, "./merged")

Planning is in :mod:`mergepipe.planner`, execution in :mod:`mergepipe.engine`,
records in :mod:`mergepipe.catalog`.
"""
from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import duckdb
import sqlalchemy as sa

from mergepipe.catalog.register import register_model
from mergepipe.catalog.store import Catalog, open_catalog
from mergepipe.engine.execute import DEFAULT_BLOCK_BYTES, ExecReport, execute_plan
from mergepipe.engine.recovery import RecoverReport, VerifyResult, recover, verify_dir
from mergepipe.engine.transaction import (ApplyResult, RunTicket, abort_run, begin_run,
                                          check_output, commit_run, committed_result)
from mergepipe.errors import MergePipeError
from mergepipe.planner.build import build_exact_plan, load_plan, resolve_model, store_plan
from mergepipe.planner.plan import Plan

__all__ = ["open_catalog", "register", "resolve_model", "build_plan", "store_plan", "load_plan",
           "apply_plan", "begin_run", "execute_plan", "finish_run", "abort_run", "run_sql",
           "verify", "recover", "check_output", "lineage", "Plan", "ApplyResult", "RunTicket", "ExecReport",
           "VerifyResult", "RecoverReport"]


def register(cat: Catalog, path: str | Path, name: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Index a model directory (idempotent)."""
    return register_model(cat, path, name=name, progress=progress)


def build_plan(cat: Catalog, spec: str | Path | dict[str, Any], io_budget: str | int | None = None,
               seed: int | None = None, analyze: bool = True, progress: bool = False,
               store: bool = True) -> Plan:
    """Plan a merge (exact, or under an expert I/O budget) and store it.

    Planning is all-or-nothing: a spec that fails to plan leaves no trace,
    not even the models its paths would have registered.
    """
    before = list(cat.fresh_models)
    try:
        plan = build_exact_plan(cat, spec, seed=seed)
        if io_budget is not None:
            from mergepipe.planner.budget import apply_budget
            plan = apply_budget(cat, plan, io_budget, analyze=analyze, progress=progress)
        if store:
            plan.stored_now = store_plan(cat, plan)  # type: ignore[attr-defined]
    except BaseException:
        _forget_fresh_models(cat, before)
        raise
    return plan


def _forget_fresh_models(cat: Catalog, keep: list[str]) -> None:
    for model_id in [m for m in cat.fresh_models if m not in keep]:
        cat.delete_model(model_id)
        cat.fresh_models.remove(model_id)


def finish_run(cat: Catalog, plan: Plan, ticket: RunTicket, report: ExecReport,
               name: str | None = None) -> ApplyResult:
    """Commit a run whose engine work is done (possibly in another process)."""
    return commit_run(cat, plan, ticket, report, name)


def apply_plan(cat: Catalog, plan: Plan, out: str | Path, name: str | None = None,
               overwrite: bool = False, device: str = "cpu", allow_nonfinite: bool = False,
               block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False) -> ApplyResult:
    """Execute a plan transactionally; an already-committed plan returns its commit."""
    existing = committed_result(cat, plan)
    if existing is not None:
        return existing
    inserted = getattr(plan, "stored_now", False)
    try:
        ticket = begin_run(cat, plan, out, overwrite=overwrite, plan_inserted=inserted,
                           device=device, name=name or Path(out).expanduser().resolve().name)
    except BaseException:
        if inserted:
            from mergepipe.catalog import schema
            cat.execute(schema.plans.delete().where(schema.plans.c.plan_id == plan.plan_id))
        _forget_fresh_models(cat, [])
        raise
    try:
        report = execute_plan(plan, ticket.staging, device=device, block_bytes=block_bytes,
                              allow_nonfinite=allow_nonfinite, progress=progress)
        return commit_run(cat, plan, ticket, report, name)
    except BaseException as exc:
        abort_run(cat, ticket)
        _forget_fresh_models(cat, [])
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = ticket.out  # a failed write names no file; say where it went
        raise


def verify(path: str | Path) -> VerifyResult:
    return verify_dir(path)


_READ_ONLY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\b\s*(?:\(.*?\)\s*)?(?:ANALY[SZ]E\b)?(.*)$",
                      re.IGNORECASE | re.DOTALL)
_PRAGMA = re.compile(r"^\s*PRAGMA\s+(\w+)", re.IGNORECASE)
# pragmas that only describe the database; the others set options (profiling files...)
_READ_PRAGMAS = {"table_info", "show_tables", "show_tables_expanded", "database_size",
                 "database_list", "storage_info", "show", "version", "platform",
                 "metadata_info", "collations", "functions", "user_agent"}
DEFAULT_SQL_TIMEOUT = 5.0


# PostgreSQL functions that reach the server's files (superusers may call them)
_PG_FILE_FUNCS = re.compile(r"\b(pg_read_file|pg_read_binary_file|pg_ls_\w+|pg_stat_file|"
                            r"lo_import|lo_export|pg_file_\w+|dblink\w*)\s*\(", re.IGNORECASE)


def _check_read_only(query: str, strict: bool = True) -> None:
    """One statement, and one that cannot write (EXPLAIN ANALYZE runs its statement).

    DuckDB's parser (PostgreSQL's grammar) classifies it; with ``strict`` off
    (a PostgreSQL catalog) a statement it cannot parse is left to the server's
    READ ONLY transaction."""
    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as exc:
        if not strict:
            return
        raise MergePipeError(f"SQL error: {str(exc).splitlines()[0]}")
    if not stmts:
        raise MergePipeError("no SQL statement given")
    if len(stmts) > 1:
        raise MergePipeError("`mergepipe sql` runs one statement at a time")
    kind = stmts[0].type.name
    if kind not in _READ_ONLY_TYPES:
        raise MergePipeError(f"`mergepipe sql` is read-only: {kind} statements are refused")
    if kind == "PRAGMA":
        m = _PRAGMA.match(stmts[0].query)
        if not m or m.group(1).lower() not in _READ_PRAGMAS:
            raise MergePipeError(f"`mergepipe sql` is read-only: PRAGMA "
                                 f"{m.group(1) if m else ''} is refused (allowed: "
                                 f"{', '.join(sorted(_READ_PRAGMAS))})")
    if kind == "EXPLAIN":
        m = _EXPLAIN.match(stmts[0].query)
        inner = duckdb.extract_statements(m.group(1)) if m and m.group(1).strip() else []
        if len(inner) != 1 or inner[0].type.name != "SELECT":
            raise MergePipeError("`mergepipe sql` is read-only: EXPLAIN is allowed for SELECT "
                                 "statements only")


def run_sql(cat: Catalog, query: str, timeout: float = DEFAULT_SQL_TIMEOUT) -> list[dict[str, Any]]:
    """Run one read-only statement over the catalog, interrupted after ``timeout`` seconds.

    The statement is checked first (SELECT, describing PRAGMAs, EXPLAIN of a
    SELECT). On DuckDB a handle opened read-only is also sandboxed (no file,
    URL or extension access). On PostgreSQL it runs in a READ ONLY transaction
    with a ``statement_timeout``, and server-file functions are refused; give
    `--catalog` a role without superuser or pg_read_server_files for more.
    """
    if not (timeout > 0 and math.isfinite(timeout)):
        raise MergePipeError(f"--timeout must be a positive number of seconds, got {timeout}")
    _check_read_only(query, strict=cat.is_duckdb)
    if not cat.is_duckdb and _PG_FILE_FUNCS.search(query):
        raise MergePipeError("`mergepipe sql` does not call functions that reach server files")
    if cat.is_duckdb:
        if cat.read_only and not getattr(cat, "_sandboxed", False):
            cat.sandbox()
            cat._sandboxed = True  # type: ignore[attr-defined]
    timer = None
    if cat.is_duckdb:  # DuckDB has no statement timeout: interrupt from a timer thread
        timer = threading.Timer(timeout, cat.conn.connection.dbapi_connection.interrupt)
        timer.daemon = True
    try:
        with cat.conn.begin() as tx:
            if not cat.is_duckdb:
                cat.conn.execute(sa.text("SET TRANSACTION READ ONLY"))
                cat.conn.execute(sa.text(f"SET LOCAL statement_timeout = {int(timeout * 1000)}"))
            if timer is not None:
                timer.start()
            res = cat.conn.exec_driver_sql(query)
            rows = [dict(r._mapping) for r in res] if res.returns_rows else []
            tx.rollback()
            return rows
    except sa.exc.DBAPIError as exc:
        msg = str(exc.orig).splitlines()[0] if exc.orig else str(exc)
        if isinstance(exc.orig, duckdb.InterruptException) or "statement timeout" in msg:
            raise MergePipeError(f"SQL query ran past the {timeout:g} s timeout and was "
                                 f"stopped (--timeout to allow more)")
        raise MergePipeError(f"SQL error: {msg}")
    finally:
        if timer is not None:
            timer.cancel()


def lineage(cat: Catalog, name: str) -> list[dict[str, Any]]:
    """Every ancestry edge of a model, nearest first.

    A breadth-first walk that visits each model once, so it ends on any
    catalog, even one whose lineage loops (older versions could write that).
    """
    from mergepipe.catalog import schema
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
        frontier = []
        for r in rows:
            out.append({"depth": depth, **{k: r[k] for k in ("child", "parent", "role", "weight",
                                                              "method", "plan_id")}})
            if r["parent_model_id"] not in seen:
                seen.add(r["parent_model_id"])
                frontier.append(r["parent_model_id"])
        depth += 1
    return out

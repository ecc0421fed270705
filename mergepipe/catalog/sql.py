"""Read-only SQL over the catalog: one checked statement, sandboxed and timed out.

What `mergepipe sql` runs. Checking the statement before it runs keeps a
question from ever becoming a write, whatever the database.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Any

import duckdb
import sqlalchemy as sa

from mergepipe.catalog import DEFAULT_SQL_TIMEOUT
from mergepipe.catalog.store import Catalog
from mergepipe.errors import MergePipeError

_READ_ONLY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}
_EXPLAIN = re.compile(r"^\s*EXPLAIN\b\s*(?:\(.*?\)\s*)?(?:ANALY[SZ]E\b)?(.*)$",
                      re.IGNORECASE | re.DOTALL)
_PRAGMA = re.compile(r"^\s*PRAGMA\s+(\w+)", re.IGNORECASE)
# pragmas that only describe the database; the others set options (profiling files...)
_READ_PRAGMAS = {"table_info", "show_tables", "show_tables_expanded", "database_size",
                 "database_list", "storage_info", "show", "version", "platform",
                 "metadata_info", "collations", "functions", "user_agent"}


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

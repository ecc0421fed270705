"""The catalog: one handle over the SQL database that records everything.

The default is an embedded DuckDB file in the workspace; any SQLAlchemy URL
(PostgreSQL for a team) works through the same Core statements. DuckDB allows a
single read-write process per file, so opening a held catalog raises
:class:`CatalogLockedError` naming the holder instead of a driver traceback.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mergepipe.catalog import schema
from mergepipe.errors import CatalogLockedError, MergePipeError

def workspace_home(home: str | Path | None = None) -> Path:
    """The workspace directory: ``home``, else $MERGEPIPE_HOME, else ~/.mergepipe.

    It holds the DuckDB catalog, search checkpoints and the demo's output."""
    return Path(home or os.environ.get("MERGEPIPE_HOME") or "~/.mergepipe").expanduser().resolve()


def now() -> dt.datetime:
    """UTC timestamp without tzinfo (portable across DuckDB and PostgreSQL)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


def catalog_url(home: str | Path | None = None, url: str | None = None) -> str:
    """Resolve the catalog URL: an explicit URL wins, else DIR/catalog.duckdb."""
    if url:
        if url.startswith("postgresql://"):
            import importlib.util
            if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
                url = "postgresql+psycopg2://" + url[len("postgresql://"):]
        return url
    home_dir = workspace_home(home)
    home_dir.mkdir(parents=True, exist_ok=True)
    return f"duckdb:///{home_dir / 'catalog.duckdb'}"


_LOCK_PID = re.compile(r"PID (\d+)")


class Catalog:
    """An open catalog. Use as a context manager; it holds one connection."""

    def __init__(self, url: str, read_only: bool = False):
        self.url = url
        self.read_only = read_only
        self.is_duckdb = url.startswith("duckdb:")
        # models registered implicitly (spec paths) through this handle; a failed
        # apply removes them again so bad input leaves the catalog unchanged
        self.fresh_models: list[str] = []
        connect_args: dict[str, Any] = {}
        if self.is_duckdb and read_only:
            connect_args["read_only"] = True
        self._connect(connect_args)
        if not read_only:
            self._ensure_schema()
        elif self._older_schema():  # upgrade once read-write, so SQL sees every column
            self.close()
            Catalog(url).close()
            self._connect(connect_args)

    # -- lifecycle -------------------------------------------------------
    def _connect(self, connect_args: dict[str, Any]) -> None:
        try:
            self.engine: Engine = sa.create_engine(self.url, connect_args=connect_args,
                                                   poolclass=sa.pool.StaticPool)
            self.conn: Connection = self.engine.connect()
        except Exception as exc:  # driver errors vary; translate the lock case
            raise _translate_open_error(self.url, exc, self.read_only) from None

    def _schema_current(self) -> bool:
        """Whether the catalog already has exactly this mergepipe's tables and views
        (then opening it changes and checks nothing: no DDL, no bound parameters)."""
        try:
            rows = dict(self.conn.exec_driver_sql(
                "SELECT key, value FROM meta WHERE key IN ('schema_version', 'schema_hash')"
            ).fetchall())
        except sa.exc.DBAPIError:  # no meta table yet
            rows = {}
        finally:
            self.conn.rollback()
        return rows.get("schema_version") == str(schema.SCHEMA_VERSION) and \
            rows.get("schema_hash") == schema.fingerprint()

    def _ensure_schema(self) -> None:
        if self._schema_current():
            return
        with self.conn.begin():  # a newer catalog raises inside: nothing is changed
            schema.metadata.create_all(self.conn)
            version = self._schema_version()
            if version is not None and version > schema.SCHEMA_VERSION:
                raise MergePipeError(
                    f"catalog schema version {version} is newer than this mergepipe "
                    f"({schema.SCHEMA_VERSION}); upgrade mergepipe")
            for table, column in schema.ADDED_COLUMNS:  # idempotent, for older catalogs
                kind = table.c[column].type.compile(dialect=self.conn.dialect)
                self.conn.exec_driver_sql(
                    f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {column} {kind}")
            for view, body in schema.VIEWS.items():
                self.conn.exec_driver_sql(f"CREATE OR REPLACE VIEW {view} AS {body}")
            if version is None:
                self.conn.execute(schema.meta.insert().values(
                    key="schema_version", value=str(schema.SCHEMA_VERSION)))
            elif version < schema.SCHEMA_VERSION:
                self.conn.execute(schema.meta.update().where(
                    schema.meta.c.key == "schema_version").values(
                    value=str(schema.SCHEMA_VERSION)))
            self.conn.execute(schema.meta.delete().where(schema.meta.c.key == "schema_hash"))
            self.conn.execute(schema.meta.insert().values(key="schema_hash",
                                                          value=schema.fingerprint()))

    def _schema_version(self) -> int | None:
        # a literal, not a bound parameter: DuckDB imports pandas (seconds) to bind
        # one, and every command, `sql` and `models` included, opens through here
        row = self.conn.exec_driver_sql(
            "SELECT value FROM meta WHERE key = 'schema_version'").first()
        return int(row[0]) if row else None

    def _older_schema(self) -> bool:
        """Whether the catalog predates this mergepipe's schema (an empty one does not)."""
        try:
            version = self._schema_version()
        except sa.exc.DBAPIError:  # no meta table yet
            version = None
        finally:
            self.conn.rollback()
        return version is not None and version < schema.SCHEMA_VERSION

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """All-or-nothing block: a failure inside leaves the catalog unchanged."""
        if self.conn.in_transaction():
            with self.conn.begin_nested() if not self.is_duckdb else _noop():
                yield self.conn
        else:
            with self.conn.begin():
                yield self.conn

    @property
    def home(self) -> Path | None:
        """The workspace directory of a DuckDB catalog (None for a server database)."""
        if not self.is_duckdb:
            return None
        path = self.url.split(":///", 1)[-1].split("?", 1)[0]
        if not path or path == ":memory:":
            return None
        return Path(path).resolve().parent

    def sandbox(self) -> None:
        """Lock a read-only DuckDB handle down for user SQL: no file, URL or
        extension access and no way to turn that back on."""
        if not (self.is_duckdb and self.read_only):
            raise MergePipeError("only a read-only DuckDB catalog handle can be sandboxed")
        for setting in ("enable_external_access = false", "autoload_known_extensions = false",
                        "autoinstall_known_extensions = false", "lock_configuration = true"):
            self.conn.exec_driver_sql(f"SET {setting}")
        self.conn.rollback()

    # -- generic helpers ----------------------------------------------------
    def execute(self, stmt: Any, params: Any = None) -> None:
        """Run a write statement in its own transaction (or the open one)."""
        with self.transaction() as c:
            c.execute(stmt, params) if params is not None else c.execute(stmt)

    def rows(self, stmt: Any, params: Any = None) -> list[dict[str, Any]]:
        """Run a query and return plain dicts (fetched before the transaction ends)."""
        with self.transaction() as c:
            res = c.execute(stmt, params) if params is not None else c.execute(stmt)
            return [dict(r._mapping) for r in res]

    # -- models ---------------------------------------------------------
    def model_by_name(self, name: str) -> dict[str, Any] | None:
        t = schema.models
        r = self.rows(sa.select(t).where(t.c.name == name))
        return r[0] if r else None

    def model_by_id(self, model_id: str) -> dict[str, Any] | None:
        t = schema.models
        r = self.rows(sa.select(t).where(t.c.model_id == model_id))
        return r[0] if r else None

    def model_by_path(self, path: str | Path) -> dict[str, Any] | None:
        t = schema.models
        r = self.rows(sa.select(t).where(t.c.path == str(Path(path).resolve())))
        return r[0] if r else None

    def require_model(self, name_or_id: str) -> dict[str, Any]:
        m = self.model_by_name(name_or_id) or self.model_by_id(name_or_id)
        if m is None:
            raise MergePipeError(f"no model named {name_or_id!r} in the catalog "
                                 f"(register it with `mergepipe register PATH`)")
        return m

    def delete_model(self, model_id: str) -> None:
        """Remove a model and everything indexed about it (not its files)."""
        with self.transaction() as c:
            for t in (schema.tensors, schema.files, schema.models):
                c.execute(t.delete().where(t.c.model_id == model_id))
            for col in ("expert_model_id", "base_model_id"):
                c.execute(schema.block_stats.delete().where(schema.block_stats.c[col] == model_id))
                c.execute(schema.stats_runs.delete().where(schema.stats_runs.c[col] == model_id))

    def model_tensors(self, model_id: str) -> list[dict[str, Any]]:
        t = schema.tensors
        return self.rows(sa.select(t).where(t.c.model_id == model_id))

    # -- evaluations ------------------------------------------------------
    def record_evaluation(self, model_id: str, task: str, metrics: dict[str, float], n: int,
                          backend: str, split: str | None = None,
                          wall_s: float | None = None) -> None:
        """Store one row per metric so SQL users can pivot freely."""
        created = now()
        with self.transaction() as c:
            for metric, value in metrics.items():
                c.execute(schema.evaluations.insert().values(
                    eval_id=new_id(), model_id=model_id, task=task, split=split,
                    metric=metric, value=float(value), n=int(n), backend=backend,
                    wall_s=wall_s, created_at=created))

    def latest_evaluation(self, model_id: str, task: str) -> dict[str, float] | None:
        t = schema.evaluations
        rows = self.rows(sa.select(t).where(t.c.model_id == model_id, t.c.task == task)
                         .order_by(t.c.created_at))
        if not rows:
            return None
        out: dict[str, float] = {}
        for r in rows:  # later rows win
            out[r["metric"]] = r["value"]
            out["n"] = r["n"]
        return out


@contextmanager
def _noop() -> Iterator[None]:
    yield


def _translate_open_error(url: str, exc: Exception, read_only: bool = False) -> MergePipeError:
    msg = str(exc)
    if "lock" in msg.lower():
        m = _LOCK_PID.search(msg)
        holder = f"pid {m.group(1)}" if m else "another process"
        why = ("; DuckDB lets no other process open the file, not even read-only, while one "
               "writes it" if read_only else "")
        return CatalogLockedError(f"catalog is in use by {holder} ({url}){why}; wait for it "
                                  f"to finish or point --home/--catalog elsewhere")
    if read_only and url.startswith("duckdb:") and not Path(url.split(":///", 1)[-1]).exists():
        return MergePipeError(f"no catalog at {url.split(':///', 1)[-1]} "
                              f"(run `mergepipe init` or register a model first)")
    return MergePipeError(f"cannot open catalog {url}: {msg.splitlines()[0] if msg else exc}")


def open_catalog(home: str | Path | None = None, url: str | None = None,
                 read_only: bool = False) -> Catalog:
    """Open (creating if needed) the workspace catalog."""
    return Catalog(catalog_url(home, url), read_only=read_only)


def dumps(obj: Any) -> str:
    """Canonical JSON used for hashing and storage."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)

"""`mergepipe sql` reads the catalog and nothing else, and stops on time."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.safety import one_line_error
from tests.test_postgres import pg_url  # noqa: F401  (a throwaway PostgreSQL cluster)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ws(cli, tmp_path):
    cli("init")
    return cli


def _refused(cli, tmp_path, query: str, needle: str, *extra: str) -> None:
    catalog = cli.home / "catalog.duckdb"
    before, files = _digest(catalog), sorted(p.name for p in tmp_path.iterdir())
    res = cli("sql", query, *extra, ok=False)
    one_line_error(res, needle)
    assert _digest(catalog) == before  # not even rewritten: sql opens it read-only
    assert sorted(p.name for p in tmp_path.iterdir()) == files


@pytest.mark.parametrize("query,needle", [
    ("EXPLAIN ANALYZE COPY (SELECT 'x') TO '{catalog}' (HEADER false)", "EXPLAIN is allowed for SELECT"),
    ("EXPLAIN ANALYZE INSERT INTO meta VALUES ('a', 'b')", "EXPLAIN is allowed for SELECT"),
    ("explain analyse delete from models", "EXPLAIN is allowed for SELECT"),
    ("EXPLAIN COPY models TO '{tmp}/leak.csv'", "EXPLAIN is allowed for SELECT"),
    ("COPY models TO '{tmp}/leak.csv'", "COPY statements are refused"),
    ("INSERT INTO meta VALUES ('a', 'b')", "INSERT statements are refused"),
    ("DROP TABLE models", "DROP statements are refused"),
    ("ATTACH '{tmp}/other.duckdb' AS o", "ATTACH statements are refused"),
    ("CREATE TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("SET enable_external_access = true", "SET statements are refused"),
    ("INSTALL httpfs", "statements are refused"),
    ("SELECT 1; DROP TABLE models", "one statement at a time"),
    ("SELECT * FROM read_text('{secret}')", "disabled by configuration"),
    ("SELECT * FROM read_blob('{secret}')", "disabled by configuration"),
    ("SELECT * FROM read_csv('{secret}')", "disabled by configuration"),
    ("SELECT * FROM glob('{tmp}/*')", "disabled by configuration"),
    ("SELECT * FROM read_csv('https://example.invalid/x.csv')", "disabled by configuration"),
    ("SELECT * FROM read_parquet('s3://bucket/x.parquet')", "disabled by configuration"),
    ("PRAGMA enable_profiling", "PRAGMA enable_profiling is refused"),
    ("PRAGMA profiling_output = '{tmp}/prof.json'", "SET statements are refused"),
    ("PRAGMA disable_checkpoint_on_shutdown", "PRAGMA disable_checkpoint_on_shutdown is refused"),
    ("SELEC 1", "SQL error"),
    ("", "no SQL statement given"),
])
def test_refused_queries(ws, tmp_path, query, needle):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:hash\n")
    q = query.format(catalog=ws.home / "catalog.duckdb", tmp=tmp_path, secret=secret)
    _refused(ws, tmp_path, q, needle)
    assert secret.read_text() == "root:hash\n"


def test_read_only_queries_still_work(ws, tmp_path):
    catalog = ws.home / "catalog.duckdb"
    before = _digest(catalog)
    res = ws("sql", "SELECT count(*) AS n FROM models", "--format", "json")
    assert json.loads(res.output) == {"n": 0}
    assert "physical_plan" in ws("sql", "EXPLAIN SELECT * FROM models").output
    assert "model_id" in ws("sql", "PRAGMA table_info('models')").output
    assert "analyzed_plan" in ws("sql", "EXPLAIN ANALYZE SELECT * FROM models").output
    assert _digest(catalog) == before


def test_timeout_interrupts_a_runaway_query(ws, tmp_path):
    _refused(ws, tmp_path, "SELECT count(*) FROM range(100000000000000::BIGINT)",
             "ran past the 0.5 s timeout", "--timeout", "0.5")
    assert ws("sql", "SELECT 42 AS x", "--timeout", "0.5").exit_code == 0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_bad_timeout(ws, tmp_path, value):
    _refused(ws, tmp_path, "SELECT 1", "--timeout must be a positive number", "--timeout", value)


def test_no_catalog_yet(cli, tmp_path):
    res = cli("sql", "SELECT 1", ok=False)
    one_line_error(res, "no catalog at")
    assert not (cli.home / "catalog.duckdb").exists()


def test_sql_while_another_process_writes(ws, tmp_path):
    """DuckDB lets no second process open a file one process writes, even read-only:
    `sql` says so in one line instead of waiting or failing with a traceback."""
    catalog = ws.home / "catalog.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); time.sleep(60)", str(catalog)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = ws("sql", "SELECT 1", ok=False)
        line = one_line_error(res, f"catalog is in use by pid {holder.pid}")
        assert "not even read-only" in line and res.exit_code == 3
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while ws("sql", "SELECT 1", ok=False).exit_code != 0 and time.monotonic() < deadline:
        time.sleep(0.1)  # the lock goes with the process
    assert ws("sql", "SELECT 1").exit_code == 0


def test_library_run_sql_refuses_writes_on_a_read_write_handle(ws):
    from mergepipe import api
    from mergepipe.errors import MergePipeError
    with api.open_catalog(ws.home) as cat:
        with pytest.raises(MergePipeError, match="EXPLAIN is allowed for SELECT"):
            api.run_sql(cat, "EXPLAIN ANALYZE DELETE FROM models")
        assert api.run_sql(cat, "SELECT count(*) AS n FROM models") == [{"n": 0}]


@pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
                    reason="PostgreSQL server binaries not installed")
def test_postgres_sql_is_read_only_and_timed(pg_url, tmp_path):
    """On PostgreSQL: a READ ONLY transaction with a statement_timeout; server-file
    functions and COPY refused (the catalog role here is a superuser)."""
    from click.testing import CliRunner

    from mergepipe.cli import cli

    def run(*args: str):
        return CliRunner().invoke(cli, ["--catalog", pg_url, *map(str, args)])

    assert run("init").exit_code == 0
    leak = tmp_path / "leak.csv"
    for query, needle in [
        ("SELECT pg_sleep(30)", "ran past the 0.5 s timeout"),
        ("WITH d AS (DELETE FROM runs RETURNING *) SELECT * FROM d", "read-only transaction"),
        (f"COPY (SELECT 1) TO '{leak}'", "COPY statements are refused"),
        ("SELECT pg_read_file('/etc/hostname')", "functions that reach server files"),
        ("SELECT * FROM pg_ls_dir('/')", "functions that reach server files"),
    ]:
        one_line_error(run("sql", query, "--timeout", "0.5"), needle)
    assert not leak.exists()
    assert run("sql", "SELECT count(*) AS n FROM models", "--format", "json").output.strip() \
        == '{"n": 0}'

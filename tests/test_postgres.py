"""The same catalog code against PostgreSQL (a shared catalog for a team).

Starts a throwaway cluster on loopback when the server binaries are present.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import write_spec

pytestmark = pytest.mark.skipif(shutil.which("initdb") is None or shutil.which("pg_ctl") is None,
                                reason="PostgreSQL server binaries not installed")


def _as_pg_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


@pytest.fixture(scope="module")
def pg_url():
    pytest.importorskip("psycopg2")
    root = Path(tempfile.mkdtemp(prefix="mp-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(_as_pg_user() + ["initdb", "-D", str(data), "-A", "trust", "-U", "mp"],
                   check=True, capture_output=True)
    subprocess.run(_as_pg_user() + ["pg_ctl", "-D", str(data), "-l", str(root / "log"), "-o",
                                    f"-k {root} -p {port} -h 127.0.0.1", "start"],
                   check=True, capture_output=True)
    url = f"postgresql://mp@127.0.0.1:{port}/postgres"
    for _ in range(50):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield url
    subprocess.run(_as_pg_user() + ["pg_ctl", "-D", str(data), "stop", "-m", "immediate"],
                   capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def test_register_plan_apply_and_lineage_on_postgres(pg_url, tiny_family, tmp_path):
    from click.testing import CliRunner

    from mergepipe.cli import cli

    def run(*args: str, ok: bool = True):
        res = CliRunner().invoke(cli, ["--catalog", pg_url, *map(str, args)])
        assert (res.exit_code == 0) == ok, res.output + (res.stderr or "")
        return res

    run("register", tiny_family["base"], "--name", "pg-base")
    run("register", tiny_family["e1"], "--name", "pg-e1")
    spec = write_spec(tmp_path / "ta.yml", "merge_method: task_arithmetic\nbase_model: pg-base\n"
                      "models:\n  - model: pg-e1\n    parameters: {weight: 0.25}\n")
    run("apply", spec, "--out", tmp_path / "out", "--name", "pg-merged")
    out = run("sql", "SELECT child, parent, weight FROM lineage_view WHERE role = 'expert'",
              "--format", "csv").output
    assert out.splitlines() == ["child,parent,weight", "pg-merged,pg-e1,0.25"]
    res = run("sql", "DELETE FROM runs", ok=False)
    assert "read-only" in res.stderr

"""Registration, name parsing, staleness and the catalog lock."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.names import parse_tensor_name
from mergepipe.catalog.store import open_catalog
from tests.conftest import make_llama


def test_layer_indices_are_parsed_with_anchored_patterns():
    assert parse_tensor_name("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj")
    assert parse_tensor_name("model.layers.1.self_attn.q_proj.weight") == (1, "self_attn.q_proj")
    assert parse_tensor_name("transformer.h.3.attn.c_attn.weight") == (3, "attn.c_attn")
    assert parse_tensor_name("model.embed_tokens.weight") == (None, "embed_tokens")
    assert parse_tensor_name("lm_head.weight") == (None, "lm_head")
    assert parse_tensor_name("model.norm.weight") == (None, "final_norm")
    assert parse_tensor_name("model.layers12.weight")[0] is None


def test_register_indexes_every_tensor_from_headers(cli, tiny_family):
    cli("register", tiny_family["base"], "--name", "base")
    with open_catalog(cli.home) as cat:
        m = cat.require_model("base")
        rows = cat.model_tensors(m["model_id"])
    from safetensors import safe_open
    with safe_open(tiny_family["base"] / "model.safetensors", "pt") as f:
        names = set(f.keys())
        q = f.get_tensor("model.layers.2.self_attn.q_proj.weight")
    assert {r["name"] for r in rows} == names
    row = next(r for r in rows if r["name"] == "model.layers.2.self_attn.q_proj.weight")
    assert row["layer"] == 2 and row["module"] == "self_attn.q_proj"
    assert json.loads(row["shape"]) == list(q.shape) and row["dtype"] == "F32"
    with open(tiny_family["base"] / "model.safetensors", "rb") as f:
        f.seek(row["byte_offset"])
        raw = f.read(row["byte_length"])
    assert raw == q.numpy().tobytes()
    assert m["num_layers"] == 4


def test_register_is_idempotent(cli, tiny_family):
    cli("register", tiny_family["base"], "--name", "base")
    before = cli.snapshot()
    cli("register", tiny_family["base"], "--name", "base")
    assert cli.snapshot() == before


def test_sharded_checkpoint_is_indexed_across_shards(cli, tmp_path):
    path = make_llama(tmp_path / "sharded", 5, hidden=64, shard="40KB")
    assert (path / "model.safetensors.index.json").exists()
    cli("register", path, "--name", "sharded")
    with open_catalog(cli.home) as cat:
        rows = cat.model_tensors(cat.require_model("sharded")["model_id"])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert {r["name"]: r["file"] for r in rows} == index["weight_map"]
    assert len({r["file"] for r in rows}) > 1


def test_changed_files_are_detected_and_refused(cli, family, tmp_path):
    cli("register", family["base"], "--name", "base")
    cli("register", family["e1"], "--name", "e1")
    f = family["e1"] / "model.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    spec = tmp_path / "ta.yml"
    spec.write_text("merge_method: task_arithmetic\nbase_model: base\n"
                    "models:\n  - model: e1\n    parameters: {weight: 0.5}\n")
    res = cli("plan", spec, ok=False)
    assert res.exit_code != 0
    assert "changed since it was registered" in res.stderr
    cli("register", family["e1"], "--name", "e1")  # re-index, then it plans
    cli("plan", spec)


def test_second_writer_gets_a_clear_lock_error(cli, tmp_path):
    cli("init")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mergepipe.catalog.store import open_catalog
        cat = open_catalog({str(cli.home)!r})
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(cli.home),
                              "models"], capture_output=True, text=True)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: catalog is in use by pid")
        assert str(holder.pid) in lines[0]
    finally:
        holder.kill()
        holder.wait()


def test_schema_version_is_recorded(cli):
    cli("init")
    with open_catalog(cli.home) as cat:
        v = cat.rows(sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version"))
    assert v == [{"value": str(schema.SCHEMA_VERSION)}]


def test_an_up_to_date_catalog_opens_without_ddl_and_a_changed_schema_gets_it(tmp_path, monkeypatch):
    """Opening is cheap when the stored schema hash matches (no DDL, no bound parameters);
    a schema that changed, even at the same version, is brought up to date on open."""
    from mergepipe.catalog import schema
    from mergepipe.catalog.store import open_catalog
    with open_catalog(tmp_path) as cat:
        assert cat.conn.exec_driver_sql("SELECT value FROM meta WHERE key = 'schema_hash'"
                                        ).scalar() == schema.fingerprint()
        cat.conn.exec_driver_sql("DROP VIEW runs_view")
        cat.conn.commit()
    with open_catalog(tmp_path) as cat:  # current: nothing is recreated
        views = {r[0] for r in cat.conn.exec_driver_sql(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert "runs_view" not in views and "lineage_view" in views
    monkeypatch.setattr(schema, "fingerprint", lambda: "changed")
    with open_catalog(tmp_path) as cat:
        views = {r[0] for r in cat.conn.exec_driver_sql(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert "runs_view" in views
        assert cat.conn.exec_driver_sql("SELECT value FROM meta WHERE key = 'schema_hash'"
                                        ).scalar() == "changed"

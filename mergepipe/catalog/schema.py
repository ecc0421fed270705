"""Catalog tables (SQLAlchemy Core), portable between DuckDB and PostgreSQL.

DuckDB has no SERIAL, so every key is natural: content hashes, uuids, or
composite keys. Timestamps are stored as TIMESTAMP so SQL users can use them.
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Column, DateTime, Double, Integer, LargeBinary,
                        MetaData, String, Table, Text)

SCHEMA_VERSION = 4  # 2: models.repo_id and models.revision; 3: searches.summary_json;
#                      4: trials.busy_s

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String, primary_key=True),
    Column("value", Text, nullable=False),
)

models = Table(
    "models", metadata,
    Column("model_id", String, primary_key=True),      # uuid
    Column("name", String, nullable=False, unique=True),
    Column("path", Text, nullable=False),
    Column("kind", String, nullable=False),             # 'source' | 'merged'
    Column("architecture", String),
    Column("num_layers", Integer),
    Column("num_params", BigInteger),
    Column("total_bytes", BigInteger),
    Column("fingerprint", String, nullable=False),      # hash of files' (name, size, mtime)
    Column("config_json", Text),
    Column("created_at", DateTime, nullable=False),
    Column("repo_id", String),                          # hub models: org/name
    Column("revision", String),                         # hub models: the commit sha
)

files = Table(
    "files", metadata,
    Column("model_id", String, primary_key=True),
    Column("relpath", String, primary_key=True),
    Column("role", String, nullable=False),             # weights | config | tokenizer | generation | index | other
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("header_len", BigInteger),                   # weights files only
)

tensors = Table(
    "tensors", metadata,
    Column("model_id", String, primary_key=True),
    Column("name", String, primary_key=True),
    Column("layer", Integer),                           # NULL for embeddings, final norm, head
    Column("module", String, nullable=False),           # e.g. self_attn.q_proj, embed_tokens
    Column("file", String, nullable=False),             # relpath of the shard
    Column("byte_offset", BigInteger, nullable=False),  # absolute offset in the shard
    Column("byte_length", BigInteger, nullable=False),
    Column("dtype", String, nullable=False),            # safetensors dtype code: F32, BF16, ...
    Column("shape", String, nullable=False),            # JSON list
    Column("content_hash", String),                     # of the raw bytes (mergepipe.hashing)
)

plans = Table(
    "plans", metadata,
    Column("plan_id", String, primary_key=True),        # sha256 of the canonical plan
    Column("method", String, nullable=False),
    Column("base_model_id", String),
    Column("spec_json", Text, nullable=False),
    Column("plan_blob", LargeBinary, nullable=False),   # zstd-compressed canonical JSON
    Column("io_budget", BigInteger),
    Column("est_bytes_base", BigInteger, nullable=False),
    Column("est_bytes_experts", BigInteger, nullable=False),
    Column("est_bytes_full_experts", BigInteger, nullable=False),
    Column("est_bytes_out", BigInteger, nullable=False),
    Column("error_bound", Double),
    Column("error_bound_kind", String),                 # exact | estimate
    Column("created_at", DateTime, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("run_id", String, primary_key=True),
    Column("plan_id", String, nullable=False),
    Column("status", String, nullable=False),           # PENDING | COMMITTED | ROLLED_BACK | FAILED
    Column("out_path", Text, nullable=False),
    Column("staging_path", Text, nullable=False),
    Column("model_id", String),
    Column("pid", Integer),
    Column("host", String),
    Column("device", String),
    Column("bytes_read_base", BigInteger),
    Column("bytes_read_experts", BigInteger),
    Column("bytes_written", BigInteger),
    Column("wall_s", Double),
    Column("peak_rss", BigInteger),
    Column("error", Text),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
)

lineage = Table(
    "lineage", metadata,
    Column("child_model_id", String, primary_key=True),
    Column("parent_model_id", String, primary_key=True),
    Column("role", String, primary_key=True),           # base | expert
    Column("weight", Double),                            # mean weight over tensors (summary)
    Column("params_json", Text),                        # the parameters as written in the spec
    Column("plan_id", String, nullable=False),
    Column("run_id", String, nullable=False),
)

# The parameters each parent was merged with, per output layer, as the planner
# resolved them (gradients interpolated, filters applied): one row per parent and
# layer, or one per distinct setting when filters split a layer's tensors.
lineage_layers = Table(
    "lineage_layers", metadata,
    Column("child_model_id", String, nullable=False),
    Column("parent_model_id", String, nullable=False),
    Column("role", String, nullable=False),             # base | expert
    Column("layer", Integer),                           # NULL for embeddings, final norm, head
    Column("tensors", Text),                            # NULL: the whole layer; else tensor names
    Column("num_tensors", Integer, nullable=False),
    Column("weight", Double),                           # NULL for the base and weightless methods
    Column("density", Double),
    Column("params_json", Text, nullable=False),        # all parameters: per-model and merge-wide
    Column("plan_id", String, nullable=False),
    Column("run_id", String, nullable=False),
)

# A run that committed by linking (or copying) an existing commit of the same plan.
reuses = Table(
    "reuses", metadata,
    Column("run_id", String, primary_key=True),
    Column("source_run_id", String, nullable=False),
    Column("source_path", Text, nullable=False),
    Column("linked_files", Integer, nullable=False),
    Column("copied_files", Integer, nullable=False),
    Column("bytes_copied", BigInteger, nullable=False),
)

block_stats = Table(
    "block_stats", metadata,
    Column("expert_model_id", String, primary_key=True),
    Column("base_model_id", String, primary_key=True),
    Column("tensor", String, primary_key=True),
    Column("block", Integer, primary_key=True),
    Column("row_start", BigInteger, nullable=False),
    Column("row_end", BigInteger, nullable=False),
    Column("byte_offset", BigInteger, nullable=False),  # absolute offset in the expert shard
    Column("byte_length", BigInteger, nullable=False),
    Column("delta_l2", Double, nullable=False),
    Column("delta_maxabs", Double, nullable=False),
    Column("base_l2", Double, nullable=False),
)

stats_runs = Table(
    "stats_runs", metadata,
    Column("expert_model_id", String, primary_key=True),
    Column("base_model_id", String, primary_key=True),
    Column("expert_fingerprint", String, nullable=False),
    Column("base_fingerprint", String, nullable=False),
    Column("block_bytes", BigInteger, nullable=False),
    Column("bytes_read", BigInteger, nullable=False),
    Column("wall_s", Double, nullable=False),
    Column("created_at", DateTime, nullable=False),
)

evaluations = Table(
    "evaluations", metadata,
    Column("eval_id", String, primary_key=True),
    Column("model_id", String, nullable=False),
    Column("task", String, nullable=False),
    Column("split", String),
    Column("metric", String, nullable=False),           # accuracy | mean_tokens | ...
    Column("value", Double, nullable=False),
    Column("n", Integer, nullable=False),
    Column("backend", String, nullable=False),
    Column("wall_s", Double),
    Column("created_at", DateTime, nullable=False),
)

searches = Table(
    "searches", metadata,
    Column("search_id", String, primary_key=True),
    Column("algorithm", String, nullable=False),
    Column("status", String, nullable=False),           # RUNNING | FINISHED | FAILED
    Column("config_json", Text, nullable=False),
    Column("prior_json", Text),                         # per-layer priors and lengthscales
    Column("anchors_json", Text),                       # base / reasoning evaluations
    Column("created_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("summary_json", Text),     # the last summary the coordinator computed, keyed
)                                     # by the trial rows it was computed from

trials = Table(
    "trials", metadata,
    Column("search_id", String, primary_key=True),
    Column("trial", Integer, primary_key=True),
    Column("x_json", Text, nullable=False),
    Column("plan_id", String),
    Column("model_id", String),
    Column("status", String, nullable=False),           # PENDING | RUNNING | DONE | FAILED
    Column("f_acc", Double),
    Column("f_cost", Double),
    Column("accuracy", Double),
    Column("mean_tokens", Double),
    Column("worker", String),
    Column("submitted_at", DateTime),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    Column("error", Text),
    Column("busy_s", Double),     # worker seconds: more than the span when workers shared it
)


# Columns added after a table first shipped: an older catalog gains them on open
# (create_all makes missing tables, never missing columns).
ADDED_COLUMNS = [(models, "repo_id"), (models, "revision"), (searches, "summary_json"),
                 (trials, "busy_s")]


# Views for people who query lineage with SQL: names instead of ids.
VIEWS = {
    # weight: the one weight a parent had everywhere, NULL where it varies; then
    # weight_varies and weights ("0.2..0.6 by layer") say how. Commits recorded
    # before lineage_layers existed keep their mean ("mean 0.38"). New columns go
    # last: PostgreSQL's CREATE OR REPLACE VIEW only appends.
    "lineage_view": """
        SELECT c.name AS child, p.name AS parent, l.role,
               CASE WHEN s.child_model_id IS NULL THEN l.weight
                    WHEN s.wmin = s.wmax THEN s.wmin END AS weight,
               l.params_json, pl.method, l.plan_id, l.run_id, c.path AS child_path,
               c.created_at, s.wmin <> s.wmax AS weight_varies,
               CASE WHEN s.child_model_id IS NULL THEN 'mean ' || CAST(l.weight AS VARCHAR)
                    WHEN s.wmin = s.wmax THEN CAST(s.wmin AS VARCHAR)
                    ELSE CAST(s.wmin AS VARCHAR) || '..' || CAST(s.wmax AS VARCHAR) ||
                         CASE WHEN s.split THEN ' by tensor' ELSE ' by layer' END
               END AS weights
        FROM lineage l
        JOIN models c ON c.model_id = l.child_model_id
        JOIN models p ON p.model_id = l.parent_model_id
        JOIN plans pl ON pl.plan_id = l.plan_id
        LEFT JOIN (SELECT child_model_id, parent_model_id, role, MIN(weight) AS wmin,
                          MAX(weight) AS wmax,
                          COUNT(*) > COUNT(DISTINCT COALESCE(layer, -1)) AS split
                   FROM lineage_layers GROUP BY child_model_id, parent_model_id, role) s
          ON s.child_model_id = l.child_model_id AND s.parent_model_id = l.parent_model_id
         AND s.role = l.role""",
    "lineage_layers_view": """
        SELECT c.name AS child, p.name AS parent, ll.role, ll.layer, ll.weight, ll.density,
               ll.params_json, ll.tensors, ll.num_tensors, pl.method, ll.plan_id, ll.run_id
        FROM lineage_layers ll
        JOIN models c ON c.model_id = ll.child_model_id
        JOIN models p ON p.model_id = ll.parent_model_id
        JOIN plans pl ON pl.plan_id = ll.plan_id""",
    "runs_view": """
        SELECT r.run_id, r.status, m.name AS model, pl.method, r.plan_id, r.out_path,
               r.bytes_read_base, r.bytes_read_experts, pl.est_bytes_experts,
               pl.est_bytes_full_experts, r.bytes_written, r.wall_s, r.peak_rss,
               pl.io_budget, pl.error_bound, r.started_at, r.finished_at,
               u.source_run_id AS reused_from
        FROM runs r
        JOIN plans pl ON pl.plan_id = r.plan_id
        LEFT JOIN models m ON m.model_id = r.model_id
        LEFT JOIN reuses u ON u.run_id = r.run_id""",
    "evaluations_view": """
        SELECT m.name AS model, e.task, e.split, e.metric, e.value, e.n, e.backend,
               e.wall_s, e.created_at
        FROM evaluations e JOIN models m ON m.model_id = e.model_id""",
}


def fingerprint() -> str:
    """A hash of every table, column and view this code defines: a catalog that carries
    it needs no DDL on open (a changed schema, even at the same version, gets it)."""
    import hashlib
    parts = [f"{t.name}:{c.name}:{c.type!r}:{c.nullable}:{c.primary_key}"
             for t in metadata.sorted_tables for c in t.columns]
    parts += [f"view {name}:{body}" for name, body in sorted(VIEWS.items())]
    parts += [f"added {t.name}.{c}" for t, c in ADDED_COLUMNS]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

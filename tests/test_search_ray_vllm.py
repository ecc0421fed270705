"""`pool: ray` with `backend: vllm`: a resident search whose evaluator is a Ray actor
holding one vLLM engine, on a local Ray instance the coordinator starts itself.

The written front is checked against its plans here; that a vLLM engine started
from those files scores what the live engine scored is `test_search_vllm.py`'s
part (local pool), so only one engine starts in this module.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from mergepipe import api
from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog
from tests.conftest import resident_search

sys.path.insert(0, str(Path(__file__).parent))
from vllm_required import MARKS, require_vllm  # noqa: E402
from world_fixtures import built_test_world  # noqa: E402

require_vllm()
pytestmark = [*MARKS, pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                         reason="ray not installed")]


def test_a_vllm_search_runs_through_a_ray_actor_and_writes_no_candidate(
        cli, tmp_path, monkeypatch):
    ray_tmp = Path(tempfile.mkdtemp(prefix="mpray", dir="/tmp"))   # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    try:
        trials, rows = resident_search(cli, tmp_path, built_test_world(), 6, n_init=2,
                                       n_total=2, backend="vllm", pool="ray")
        assert list(ray_tmp.glob("ray/session_*")) or list(ray_tmp.glob("session_*"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert all(t["status"] == "DONE" for t in trials)
    with open_catalog(cli.home) as cat:
        evals = cat.rows(sa.select(schema.evaluations))
    assert evals and {e["backend"] for e in evals} == {"vllm"}
    for r in rows:
        assert api.verify(r["path"]).ok
        assert {l["role"] for l in r["lineage"]} == {"base", "expert"}

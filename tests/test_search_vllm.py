"""A search with `backend: vllm` and resident evaluators, end to end on the test world.

The worker starts its vLLM engine once on the base and loads each candidate into
it through the engine's worker RPC; nothing is written per candidate. The front
is then materialised through apply, and a vLLM engine started from the written
checkpoint scores what the live engine scored. One vLLM engine starts in the
worker (the two sources' anchors are loaded into it too) and one here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import sqlalchemy as sa

from mergepipe import api
from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog
from tests.conftest import resident_search

sys.path.insert(0, str(Path(__file__).parent))
from vllm_required import MARKS, require_vllm  # noqa: E402
from world_fixtures import built_test_world  # noqa: E402

require_vllm()
pytestmark = MARKS

LIMIT = 8


def test_a_vllm_search_writes_no_candidate_and_its_front_scores_the_same_from_disk(
        cli, tmp_path):
    from mergepipe.evaluate import load_task, run_task
    from mergepipe.evaluate.vllm import VLLMBackend
    world = built_test_world()
    trials, rows = resident_search(cli, tmp_path, world, LIMIT, n_init=2, n_total=3,
                                   backend="vllm")
    assert all(t["status"] == "DONE" for t in trials)
    with open_catalog(cli.home) as cat:
        backends = {r["backend"] for r in cat.rows(sa.select(schema.evaluations))}
    assert backends == {"vllm"}   # the anchors too
    task = load_task(world / "test.jsonl").head(LIMIT)
    engine = VLLMBackend(rows[0]["path"])   # one engine, started from a written checkpoint
    try:
        for i, r in enumerate(rows):
            assert api.verify(r["path"]).ok
            if i:
                engine.load_dir(r["path"])      # the next front member, read from its files
            got = run_task(engine, task)
            assert (got.accuracy, got.mean_tokens) == (r["accuracy"], r["mean_tokens"])
            assert {l["role"] for l in r["lineage"]} == {"base", "expert"}
    finally:
        engine.close()

"""A search with `backend: vllm` and resident evaluators, end to end on the test world.

The worker starts its vLLM engine once on the base and loads each candidate into
it through the engine's worker RPC; nothing is written per candidate. The front
is then materialised through apply, and a vLLM engine started from the written
checkpoint scores what the live engine scored. Three vLLM engines start in the
worker (the two sources' anchors, then the resident one) and one here.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import sqlalchemy as sa
import yaml

from mergepipe import api
from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog

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
    cfg = {"base": str(world / "base"), "reasoning": str(world / "reasoning"),
           "tasks": [str(world / "test.jsonl")], "algorithm": "sobol", "n_init": 2,
           "n_total": 3, "workers": 1, "seed": 0, "limit": LIMIT,
           "evaluator": "resident", "backend": "vllm"}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    final = json.loads(cli("search", "run", tmp_path / "s.yml", "--json")
                       .stdout.strip().splitlines()[-1])
    sid = final["search_id"]
    assert final["trials"] == 3 and final["failed"] == 0
    root = cli.home / "searches" / sid
    assert not list(root.glob("t*")) and not list(root.glob(".t*"))   # nothing per candidate
    with open_catalog(cli.home) as cat:
        trials = cat.rows(sa.select(schema.trials).order_by(schema.trials.c.trial))
        plans = {r["plan_id"] for r in cat.rows(sa.select(schema.plans.c.plan_id))}
        runs = cat.rows(sa.select(schema.runs))
        backends = {r["backend"] for r in cat.rows(sa.select(schema.evaluations))}
    assert all(t["plan_id"] in plans and t["model_id"] is None and t["status"] == "DONE"
               for t in trials) and not runs
    assert backends == {"vllm"}   # the anchors too

    rows = [json.loads(l) for l in cli("search", "pareto", sid, "--materialize", "--json")
            .stdout.splitlines()]
    assert rows and all(r["on_disk"] and r["model_id"] for r in rows)
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

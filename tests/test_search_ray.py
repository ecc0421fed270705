"""`pool: ray`: evaluators as Ray actors on a local Ray instance started by the test."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_head32_llama, write_task  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="ray not installed")]


def test_a_resident_search_runs_through_ray_actors(cli, tmp_path):
    """Runs first: the coordinator starts (and shuts down) its own local Ray instance."""
    import ray
    a = make_head32_llama(tmp_path / "a", 0)
    b = make_head32_llama(tmp_path / "b", 1, base=a)
    cfg = {"base": str(a), "reasoning": str(b), "tasks": [str(write_task(tmp_path / "t.jsonl"))],
           "algorithm": "sobol", "n_init": 3, "n_total": 3, "workers": 2, "seed": 0,
           "limit": 6, "max_new_tokens": 8, "evaluator": "resident", "pool": "ray"}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    final = json.loads(cli("search", "run", tmp_path / "s.yml", "--json")
                       .stdout.strip().splitlines()[-1])
    assert final["trials"] == 3 and final["failed"] == 0
    with open_catalog(cli.home) as cat:
        trials = cat.rows(sa.select(schema.trials))
    assert all(t["status"] == "DONE" and t["plan_id"] for t in trials)
    assert {t["worker"].split(".", 1)[1] for t in trials} <= {"w0", "w1"}
    assert not ray.is_initialized()


@dataclass
class NapJob:
    """Sleeps, then reports its process; or kills that process."""

    seconds: float
    die: bool = False
    fail: bool = False

    def run(self) -> dict:
        time.sleep(self.seconds)
        if self.die:
            os._exit(9)
        if self.fail:
            raise ValueError("bad candidate")
        return {"pid": os.getpid()}


@pytest.fixture(scope="module")
def ray_pool():
    import ray
    from ray import cloudpickle
    from mergepipe.search.ray_pool import RayPool
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # actors can't import tests/
    pool = RayPool(2, prefix="r.w")
    yield pool
    pool.close()
    assert not ray.is_initialized()


def _drain(pool, n: int) -> list:
    out = []
    while len(out) < n:
        out += pool.wait(timeout=None)
    return out


def test_actors_run_jobs_and_a_killed_actor_fails_its_trial_and_is_replaced(ray_pool):
    assert ray_pool.free() == ["r.w0", "r.w1"]
    ray_pool.submit("r.w0", 0, NapJob(0.0))
    ray_pool.submit("r.w1", 1, NapJob(0.0, fail=True))
    first = {r.trial: r for r in _drain(ray_pool, 2)}
    assert first[0].ok and first[0].value["pid"] != os.getpid() and first[0].worker == "r.w0"
    assert not first[1].ok and "bad candidate" in first[1].error
    ray_pool.submit("r.w0", 2, NapJob(0.0, die=True))
    dead = _drain(ray_pool, 1)[0]
    assert dead.trial == 2 and not dead.ok and "died" in dead.error
    ray_pool.submit("r.w0", 3, NapJob(0.0))
    again = _drain(ray_pool, 1)[0]
    assert again.ok and again.value["pid"] != first[0].value["pid"]   # a new actor process


def test_a_free_actor_takes_the_units_a_slow_owner_has_not_reached(ray_pool):
    """Actors share no memory: the claim counters live in an actor both evaluators call."""
    from mergepipe.evaluate import evaluate_model
    from mergepipe.search import sharing
    from mergepipe.search.jobs import EvaluateJob, TaskRef
    from mergepipe.world.build import ensure_world
    world = ensure_world("test")
    path = str(world / "test.jsonl")
    task, slot, board = TaskRef(path, path), sharing.slot_of(7), ray_pool.board
    owner = EvaluateJob(str(world / "reasoning"), [task], stretch=40.0, slot=slot)
    board.arm(slot)
    ray_pool.submit("r.w0", 7, owner)
    deadline = time.time() + 120
    while board.left(slot) != 1 and time.time() < deadline:
        time.sleep(0.02)   # the owner has counted two units and claimed the first
    assert board.left(slot) == 1
    ray_pool.submit("r.w1", 7, EvaluateJob(owner.model_dir, [task], slot=slot, helper=True))
    results = _drain(ray_pool, 2)
    assert all(r.ok for r in results), [r.error for r in results]
    helped = next(r for r in results if r.worker == "r.w1")
    assert helped.value["units"] and board.left(slot) == 0
    got = sharing.combine([r.value for r in results], [task])[task.name]
    whole = evaluate_model(world / "reasoning", world / "test.jsonl", device="cpu")
    assert (got["accuracy"], got["mean_tokens"], got["n"]) == \
        (whole.accuracy, whole.mean_tokens, whole.n)

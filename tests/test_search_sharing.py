"""A slow evaluation shared with free workers gives the metrics one worker would have given."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import sqlalchemy as sa
import yaml

from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog
from mergepipe.evaluate import evaluate_model, load_backend, load_task, run_task
from mergepipe.search import sharing
from mergepipe.search.jobs import EvaluateJob, TaskRef, stretch_factor
from mergepipe.search.report import timing
from mergepipe.search.workers import LocalPool
from mergepipe.world.build import ensure_world


@pytest.fixture(scope="module")
def world():
    return ensure_world("test")


def _task(world) -> TaskRef:
    path = str(world / "test.jsonl")
    return TaskRef(path, path)


def test_units_scored_one_by_one_add_up_to_the_whole_evaluation(world):
    engine = load_backend("transformers", str(world / "reasoning"), device="cpu", batch_size=16)
    whole = run_task(engine, load_task(world / "test.jsonl"))
    value = sharing.score_units(engine, [_task(world)], None)
    assert value["n_units"] == 7 == len(value["units"])   # 100 prompts in batches of 16
    units = sorted(value["units"].items())
    parts = [{**value, "units": dict(units[:3])}, {**value, "units": dict(units[3:])}]
    got = sharing.combine(parts, [_task(world)])[_task(world).name]
    assert (got["accuracy"], got["mean_tokens"], got["n"]) == \
        (whole.accuracy, whole.mean_tokens, whole.n)
    with pytest.raises(Exception, match="6 of its 7 units"):
        sharing.combine([{**value, "units": dict(units[1:])}], [_task(world)])


def test_a_free_worker_takes_the_units_a_slow_owner_has_not_reached(world):
    task, slot = _task(world), sharing.slot_of(5)
    owner = EvaluateJob(str(world / "reasoning"), [task], stretch=40.0, slot=slot)
    with LocalPool(2, "t.w") as pool:
        pool.wait_ready()
        pool.board.arm(slot)
        pool.submit("t.w0", 5, owner)
        deadline = time.time() + 60
        while pool.board.left(slot) == 0 and time.time() < deadline:
            time.sleep(0.02)   # the owner has loaded the model and claimed its first unit
        assert pool.board.left(slot) == 1
        pool.submit("t.w1", 5, EvaluateJob(owner.model_dir, [task], slot=slot, helper=True))
        results = []
        while len(results) < 2:
            results += pool.wait()
        assert all(r.ok for r in results), [r.error for r in results]
        assert sorted(len(r.value["units"]) for r in results) == [1, 1]
        pool.submit("t.w1", 5, EvaluateJob(owner.model_dir, [task], slot=slot, helper=True))
        late = pool.wait()
    assert late[0].ok and late[0].value["units"] == {}     # nothing left: no model loaded
    got = sharing.combine([r.value for r in results + late], [task])[task.name]
    whole = evaluate_model(world / "reasoning", world / "test.jsonl", device="cpu")
    assert (got["accuracy"], got["mean_tokens"], got["n"]) == \
        (whole.accuracy, whole.mean_tokens, whole.n)


@pytest.mark.parametrize("pool", [
    "local", pytest.param("ray", marks=[pytest.mark.slow, pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="ray not installed")])])
def test_a_search_lends_a_free_worker_to_its_slowest_trial_and_records_the_same_metrics(
        cli, tmp_path, world, pool):
    # seed 89: trial 0's evaluation is stretched 1.1 times, trial 1's 20 times, so the
    # worker that ends trial 0 has nothing new to run while trial 1 has units left: four
    # (two tasks of two batches), so the helper's model load cannot lose them all to the
    # owner, whatever else the machine runs
    assert stretch_factor(89, 0, 1.5) < 1.2 and stretch_factor(89, 1, 1.5) == 20.0
    again = tmp_path / "again.jsonl"
    again.write_text((world / "test.jsonl").read_text())
    config = {"base": str(world / "base"), "reasoning": str(world / "reasoning"),
              "tasks": [str(world / "test.jsonl"), str(again)], "algorithm": "sobol",
              "workers": 2,
              "seed": 89, "n_init": 2, "n_total": 2, "stretch_alpha": 1.5, "pool": pool}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(config))
    final = json.loads(cli("search", "run", tmp_path / "s.yml", "--keep-all", "--json")
                       .stdout.strip().splitlines()[-1])
    assert final["trials"] == 2 and final["failed"] == 0
    with open_catalog(cli.home) as cat:
        rows = cat.rows(sa.select(schema.trials).order_by(schema.trials.c.trial))
        evals = {r["model_id"]: r for r in cat.rows(
            sa.select(schema.models.c.model_id, schema.models.c.path))}
    span = [(r["finished_at"] - r["started_at"]).total_seconds() for r in rows]
    assert rows[1]["busy_s"] > span[1] * 1.2          # two workers were on trial 1
    assert rows[0]["busy_s"] == pytest.approx(span[0], abs=0.01)
    for r in rows:   # the shared evaluation recorded what one worker finds from disk
        whole = evaluate_model(evals[r["model_id"]]["path"], world / "test.jsonl", device="cpu")
        assert (r["accuracy"], r["mean_tokens"]) == (whole.accuracy, whole.mean_tokens)


def _row(worker: str, sub: float, start: float, end: float, busy: float | None) -> dict:
    from datetime import datetime, timedelta
    t0 = datetime(2026, 1, 1)
    return {"status": "DONE", "worker": worker, "submitted_at": t0 + timedelta(seconds=sub),
            "started_at": t0 + timedelta(seconds=start),
            "finished_at": t0 + timedelta(seconds=end), "busy_s": busy}


def test_utilisation_counts_the_helpers_seconds():
    # two workers; the second trial is handed out at 4 s and shared by both from 6 s to 10 s
    rows = [_row("s1.w0", 0, 0, 6, None), _row("s1.w1", 0, 0, 4, None),
            _row("s1.w1", 4, 4, 10, 10.0)]
    t = timing(rows, 2)
    assert t["busy_s"] == 20.0 and t["wall_s"] == 10.0 and t["utilisation"] == 1.0
    assert t["drain_idle"] == pytest.approx(0.0, abs=1e-9)
    solo = timing(rows[:2] + [_row("s1.w1", 4, 4, 10, None)], 2)
    assert solo["utilisation"] == 0.8 and solo["drain_idle"] == pytest.approx(0.2)


def test_an_older_catalog_gains_trials_busy_s_and_its_rows_count_their_span(tmp_path):
    from mergepipe.search import trials as trial_rows
    home = tmp_path / "ws"
    with open_catalog(home) as cat:   # a version-3 catalog with one finished trial
        sid = trial_rows.create_search(cat, "sobol", "{}")
        trial_rows.submit_trial(cat, sid, 0, [0.5], "p", "s1.w0")
        trial_rows.finish_trial(cat, sid, 0, ok=True, objectives=[0.1, 0.2],
                                started=1000.0, finished=1004.0)
        cat.conn.exec_driver_sql("ALTER TABLE trials DROP COLUMN busy_s")
        cat.execute(schema.meta.update().where(schema.meta.c.key == "schema_version")
                    .values(value="3"))
        cat.conn.commit()
    with open_catalog(home) as cat:
        rows = trial_rows.list_trials(cat, sid)
        assert rows[0]["busy_s"] is None
        assert timing(rows, 1)["busy_s"] == 4.0
        assert cat.rows(sa.select(schema.meta.c.value).where(
            schema.meta.c.key == "schema_version")) == [{"value": str(schema.SCHEMA_VERSION)}]


def test_the_coordinator_reads_every_trials_counters_in_one_call_per_look():
    """On a Ray pool each board call is a round trip to the counters actor; a look per
    slot made a coordinator with many trials in flight wait on as many round trips
    every time its loop polled."""
    from types import SimpleNamespace

    from mergepipe.search.coordinator import InFlight, SearchRun

    class Counting(sharing.ClaimBoard):
        calls = 0

        def survey(self, slots):
            self.calls += 1
            return super().survey(slots)

        def left(self, slot):
            raise AssertionError("the coordinator read one slot at a time")

    board = Counting()
    for slot, units, claimed in ((1, 4, 1), (2, 6, 2), (3, 0, 0)):   # trial 3 still loading
        board.arm(slot)
        if units:
            board.count(slot, units)
        for _ in range(claimed):
            board.claim(slot)
    assert board.survey([1, 2, 3]) == [(3, True), (4, True), (0, True)]
    board.calls = 0
    sent: list[tuple[str, int]] = []
    run = SearchRun.__new__(SearchRun)
    run.inflight = {t: InFlight([0.5], None, None, job=EvaluateJob("m", []), slot=t)
                    for t in (1, 2, 3)}
    pool = SimpleNamespace(board=board, free=lambda: ["w"],
                           submit=lambda worker, trial, job: sent.append((worker, trial)))
    assert run._may_share(pool) and board.calls == 1
    looked = run._share(pool, ["w4", "w5", "w6", "w7"])
    # spare units: trial 2 has 4 - 1 job, trial 1 has 3 - 1; each helper claims one next
    assert board.calls == 2
    assert sent == [("w4", 2), ("w5", 1), ("w6", 2), ("w7", 1)]
    assert [run.inflight[t].jobs for t in (1, 2, 3)] == [3, 3, 1]
    # the loop's later look in the same pass reuses that survey: no second call
    assert looked == {1: True, 2: True, 3: True}
    assert run._may_share(pool, looked) and board.calls == 2
    del run.inflight[3]                        # recorded since: its loading units are gone
    assert not run._may_share(pool, {1: False, 2: False, 3: True}) and board.calls == 2

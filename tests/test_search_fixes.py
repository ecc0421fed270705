"""Search fixes: the sources take part in the front, commits are never undone, unknown
config keys are refused, and a search without a terminal logs one line per trial."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from mergepipe import api
from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog
from mergepipe.errors import MergePipeError
from mergepipe.search import trials
from mergepipe.search.objectives import Anchors, TaskAnchor
from mergepipe.search.report import beaten_by_sources, pareto_trials


def test_sources_land_on_the_front_ends_of_the_anchored_map():
    anchors = Anchors({"a": TaskAnchor(0.34, 0.6, 5.0, 40.0), "b": TaskAnchor(0.1, 0.9, 3.0, 9.0)})
    assert anchors.source_points() == [(0.0, 1.0), (1.0, 0.0)]


def _done(trial: int, f_acc: float, f_cost: float) -> dict:
    return {"trial": trial, "status": "DONE", "f_acc": f_acc, "f_cost": f_cost}


def test_trials_the_base_dominates_are_off_the_front():
    # the case from the issue: below the base's accuracy at (nearly) its token count
    rows = [_done(0, -0.13, 1.0), _done(1, -0.07, 0.6), _done(2, 0.5, 0.5), _done(3, 1.0, -0.1)]
    sources = [(0.0, 1.0), (1.0, 0.0)]
    assert [r["trial"] for r in pareto_trials(rows)] == [0, 1, 2, 3]   # without the sources
    assert [r["trial"] for r in pareto_trials(rows, sources)] == [2]
    # a trial that ties a source is not dominated by it
    assert [r["trial"] for r in pareto_trials([_done(4, 0.0, 1.0)], sources)] == [4]


def test_trials_a_source_matches_or_beats_are_counted_as_spent_for_nothing():
    sources = [(0.0, 1.0), (1.0, 0.0)]
    rows = [_done(0, -0.13, 1.0), _done(1, 0.0, 1.0), _done(2, 0.5, 0.5), _done(3, 1.0, 0.0),
            _done(4, 0.99, 0.01), {"trial": 5, "status": "FAILED", "f_acc": -0.2, "f_cost": -0.2}]
    # 0 is beaten by the base, 1 and 3 tie a source; 2 and 4 are merges worth having,
    # and a failed trial is counted as failed, not here
    assert beaten_by_sources(rows, sources) == 3
    assert beaten_by_sources(rows, []) == 0


def _search_with_rows(home: Path, world_task: Path, points: list[tuple[float, float]]) -> str:
    """A finished search in the catalog (rows only, no models): enough for `search pareto`."""
    with open_catalog(home) as cat:
        sid = trials.create_search(cat, "sobol", {"base": "b", "reasoning": "r",
                                                 "tasks": [str(world_task)], "workers": 1})
        trials.update_search(cat, sid, status="FINISHED", anchors={
            "tasks": Anchors({str(world_task): TaskAnchor(0.34, 0.5, 5.0, 30.0)}).to_json()})
        for i, f in enumerate(points):
            trials.submit_trial(cat, sid, i, [0.1 * i], f"plan{i}", "s1.w0")
            trials.finish_trial(cat, sid, i, ok=True, objectives=f, started=1e9 + i,
                               finished=1e9 + i + 0.5, accuracy=0.3, mean_tokens=5.0)
    return sid


def test_search_pareto_and_status_leave_out_trials_the_base_dominates(cli, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "p", "answer": "1"}\n')
    # (0.3067 acc at 5 tokens against the base's 0.34 at 5 tokens) → f = (-0.2, 1.0)
    sid = _search_with_rows(cli.home, task, [(-0.2, 1.0), (0.5, 0.4), (0.4, 0.3)])
    rows = [json.loads(l) for l in cli("search", "pareto", sid, "--json").stdout.splitlines()]
    assert [r["trial"] for r in rows] == [1]
    status = json.loads(cli("search", "status", sid, "--json").stdout)
    assert status["pareto"] == 1


def test_abort_run_refuses_a_committed_run_and_keeps_model_and_lineage(tiny_family, tmp_path):
    spec = {"merge_method": "task_arithmetic", "base_model": str(tiny_family["base"]),
            "models": [{"model": str(tiny_family["e1"]), "parameters": {"weight": 0.5}}],
            "dtype": "float32"}
    with open_catalog(tmp_path / "ws") as cat:
        plan, inserted = api.build_and_store(cat, spec)
        out = tmp_path / "merged"
        ticket = api.begin_run(cat, plan, out, plan_inserted=inserted)
        report = api.execute_plan(plan, ticket.staging)
        res = api.finish_run(cat, plan, ticket, report, name="kept")
        with pytest.raises(MergePipeError, match="committed"):
            api.abort_run(cat, ticket)
        run = cat.rows(sa.select(schema.runs).where(schema.runs.c.run_id == ticket.run_id))
        lineage = cat.rows(sa.select(schema.lineage).where(
            schema.lineage.c.child_model_id == res.model_id))
        plans = cat.rows(sa.select(schema.plans).where(schema.plans.c.plan_id == plan.plan_id))
        assert [r["status"] for r in run] == ["COMMITTED"] and len(plans) == 1
        assert {r["run_id"] for r in lineage} == {ticket.run_id} and len(lineage) == 2
        assert cat.model_by_id(res.model_id)["name"] == "kept"
    assert api.verify(out).ok


def _config(path: Path, task: Path, **extra) -> Path:
    cfg = {"base": "base", "reasoning": "reasoning", "tasks": [str(task)], **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_unknown_search_key_is_refused_in_one_line_naming_it(cli, tmp_path):
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "p", "answer": "1"}\n')
    before = cli.snapshot()
    res = cli("search", "run", _config(tmp_path / "s.yml", task, n_totl=12), ok=False)
    assert res.exit_code != 0 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown search config key 'n_totl'")
    assert cli.snapshot() == before


def test_configs_stored_by_earlier_versions_still_load(tmp_path):
    from mergepipe.search.config import SearchConfig
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "p", "answer": "1"}\n')
    stored = SearchConfig.from_dict({"base": "b", "reasoning": "r", "tasks": [str(task)]}).to_json()
    assert SearchConfig.from_dict({**stored, "extra": {}}).to_json() == stored
    with pytest.raises(MergePipeError, match="'extra'"):
        SearchConfig.from_dict({**stored, "extra": {"typo": 1}})


@pytest.mark.parametrize("key, value, message", [
    ("evaluator", "disk", "unknown evaluator 'disk'; choose one of checkpoint, resident"),
    ("backend", "tgi", "unknown backend 'tgi'; choose one of transformers, vllm"),
])
def test_evaluator_and_backend_are_checked(tmp_path, key, value, message):
    from mergepipe.search.config import SearchConfig
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "p", "answer": "1"}\n')
    with pytest.raises(MergePipeError) as err:
        SearchConfig.from_dict({"base": "b", "reasoning": "r", "tasks": [str(task)], key: value})
    assert str(err.value) == message


def test_search_status_answers_from_the_stored_summary_without_torch(cli, tmp_path):
    """A summary stored by the coordinator is used while the trial rows are unchanged
    (no torch, no BoTorch); a changed row makes status compute it again."""

    from mergepipe import api
    from mergepipe.search.report import summarise
    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "p", "answer": "1"}\n')
    sid = _search_with_rows(cli.home, task, [(0.5, 0.4), (0.4, 0.3), (0.2, 0.9)])
    with open_catalog(cli.home) as cat:
        computed = api.json_ready(summarise(cat, sid))
        trials.store_summary(cat, sid, summarise(cat, sid))
    probe = ("import json, sys; sys.argv = ['mergepipe', 'search', 'status', '--json']\n"
             "from mergepipe.cli import main\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(json.dumps(sorted(m for m in ('torch', 'botorch') if m in sys.modules)))")
    env = {**__import__("os").environ, "MERGEPIPE_HOME": str(cli.home)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    status, heavy = out.stdout.strip().splitlines()
    assert json.loads(heavy) == [] and json.loads(status) == computed
    # a summary an older version stored lacks this version's fields: computed again
    with open_catalog(cli.home) as cat, pytest.MonkeyPatch.context() as mp:
        mp.setattr(trials, "SUMMARY_VERSION", trials.SUMMARY_VERSION - 1)
        trials.store_summary(cat, sid, {k: v for k, v in computed.items()
                                        if k != "beaten_by_sources"})
    assert json.loads(cli("search", "status", sid, "--json").stdout) == computed
    with open_catalog(cli.home) as cat:  # one more finished trial: the stored one is stale
        trials.submit_trial(cat, sid, 3, [0.3], "plan3", "s1.w0")
        trials.finish_trial(cat, sid, 3, ok=True, objectives=(0.6, 0.2), started=1e9 + 3,
                            finished=1e9 + 3.5, accuracy=0.4, mean_tokens=5.0)
    status = json.loads(cli("search", "status", sid, "--json").stdout)
    assert status["trials"] == 4 and status["hypervolume"] > computed["hypervolume"]

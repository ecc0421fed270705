"""End to end on the `test` world: a real search with 2 worker processes, then a kill and a resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
import yaml
from botorch.utils.multi_objective.box_decompositions.dominated import \
    DominatedPartitioning

from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog
from mergepipe.search.objectives import REF_POINT, Anchors
from mergepipe.search.source_diff import prompt_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world() -> Path:
    from mergepipe.world.build import ensure_world
    return ensure_world("test")


def write_config(path: Path, world: Path, **overrides) -> Path:
    cfg = {"base": str(world / "base"), "reasoning": str(world / "reasoning"),
           "tasks": [str(world / "test.jsonl")], "algorithm": "apbmm", "n_init": 3,
           "n_total": 5, "workers": 2, "seed": 0, "limit": 12, "probe_n": 8}
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def test_search_records_trials_prior_and_botorch_hypervolume(cli, tmp_path, world):
    cfg = write_config(tmp_path / "search.yml", world)
    res = cli("search", "run", str(cfg), "--json")
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(final) >= {"search_id", "trials", "hypervolume", "utilisation"}
    logged = [l for l in res.stderr.splitlines()
              if l.startswith(f"search {final['search_id'][:8]} trial ")]
    assert len(logged) == 5 and all(" done on " in l and "hypervolume" in l for l in logged)
    assert final["trials"] == 5 and 0 < final["utilisation"] <= 1
    sid = final["search_id"]
    with open_catalog(cli.home) as cat:
        trials = cat.rows(sa.select(schema.trials).where(schema.trials.c.search_id == sid)
                          .order_by(schema.trials.c.trial))
        search = cat.rows(sa.select(schema.searches))[0]
        plans = {r["plan_id"] for r in cat.rows(sa.select(schema.plans.c.plan_id))}
        base = cat.model_by_path(world / "base")
    assert [t["trial"] for t in trials] == list(range(5))
    assert all(t["status"] == "DONE" and t["plan_id"] in plans and t["model_id"] for t in trials)
    assert all(t["started_at"] <= t["finished_at"] and t["worker"] for t in trials)
    Y = torch.tensor([[t["f_acc"], t["f_cost"]] for t in trials], dtype=torch.double)
    expected = DominatedPartitioning(ref_point=torch.tensor(REF_POINT, dtype=torch.double),
                                     Y=Y).compute_hypervolume().item()
    assert final["hypervolume"] == pytest.approx(expected, rel=1e-9, abs=1e-12)

    prior = json.loads(search["prior_json"])
    assert len(prior["param_diff"]) == len(prior["act_diff"]) == base["num_layers"]
    assert len(prior["lengthscales"]) == base["num_layers"] + 1
    assert prior["probe"]["path"] == str((world / "train.jsonl").resolve())
    train, test = set(prompt_digest(_prompts(world / "train.jsonl"))), \
        set(prompt_digest(_prompts(world / "test.jsonl")))
    assert set(prior["probe"]["digests"]) <= train and not set(prior["probe"]["digests"]) & test
    anchors = json.loads(search["anchors_json"])
    assert len(anchors["tasks"]) == 1
    # the front a user gets also holds the two sources, which cost no trial
    sources = torch.tensor(Anchors.from_json(anchors["tasks"]).source_points(),
                           dtype=torch.double)
    with_sources = DominatedPartitioning(ref_point=torch.tensor(REF_POINT, dtype=torch.double),
                                         Y=torch.cat([Y, sources])).compute_hypervolume().item()
    assert final["hypervolume_with_sources"] == pytest.approx(with_sources, rel=1e-9, abs=1e-12)
    assert final["hypervolume_with_sources"] >= final["hypervolume"]
    assert final["beaten_by_sources"] == sum(
        1 for y in Y.tolist() if any(a >= y[0] and c >= y[1] for a, c in sources.tolist()))

    status = json.loads(cli("search", "status", sid[:8], "--json").stdout)
    assert status["hypervolume"] == pytest.approx(final["hypervolume"])
    png = tmp_path / "pareto.png"
    rows = [json.loads(l) for l in cli("search", "pareto", sid, "--plot", str(png), "--json")
            .stdout.splitlines()]
    assert png.stat().st_size > 1000 and rows
    assert all(r["on_disk"] and {l["role"] for l in r["lineage"]} == {"base", "expert"}
               for r in rows)
    on_disk = sorted(p.name for p in (cli.home / "searches" / sid).glob("t*"))
    assert on_disk == sorted(f"t{r['trial']:04d}" for r in rows)  # the rest were collected


def _snapshot(home: Path) -> dict | None:
    files = list((home / "searches").glob("*/status.json"))
    return json.loads(files[0].read_text()) if files else None


def test_resume_after_kill_neither_loses_nor_repeats_finished_trials(tmp_path, world):
    home = tmp_path / "ws"
    cfg = write_config(tmp_path / "search.yml", world, n_total=6, algorithm="sobol")
    cmd = [sys.executable, "-c", "from mergepipe.cli import main; main()", "--home", str(home),
           "search", "run", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    snap = None
    while time.time() < deadline:
        snap = _snapshot(home)
        if snap and snap["done"] >= 2:
            break
        assert proc.poll() is None, "the search ended before it could be killed"
        time.sleep(0.2)
    assert snap and snap["done"] >= 2 and snap["done"] < 6
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    sid = proc.stdout.read().decode().strip()
    T = schema.trials
    with open_catalog(home) as cat:
        before = {r["trial"]: r for r in cat.rows(sa.select(T).where(T.c.status == "DONE"))}
    assert len(before) >= 2

    from click.testing import CliRunner
    from mergepipe.cli import cli as mp
    res = CliRunner().invoke(mp, ["--home", str(home), "search", "resume", sid, "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    final = json.loads(res.stdout.strip().splitlines()[-1])
    assert final["trials"] == 6 and final["search_id"] == sid
    with open_catalog(home) as cat:
        after = cat.rows(sa.select(T).order_by(T.c.trial))
        ev = schema.evaluations
        evaluated = cat.rows(sa.select(ev.c.model_id, sa.func.count().label("n"))
                             .where(ev.c.model_id.in_([r["model_id"] for r in after]))
                             .group_by(ev.c.model_id))
    assert [r["trial"] for r in after] == list(range(6))
    assert all(r["status"] == "DONE" for r in after)
    for t, r in before.items():   # finished rows are untouched by the resume
        assert {k: after[t][k] for k in r} == r
    assert len({r["model_id"] for r in after}) == 6
    assert all(e["n"] == 2 for e in evaluated) and len(evaluated) == 6  # one evaluation each
    assert len({r["worker"].split(".")[0] for r in after}) == 2        # two coordinator sessions


def test_a_failed_evaluation_is_recorded_at_the_reference_point_with_its_error(tmp_path, world):
    """Workers die inside every merge (fault injection); the anchors, which only evaluate,
    still succeed. Each trial must become a FAILED row at the reference point carrying the
    worker's error, its run must be rolled back, and the search must still finish."""
    home = tmp_path / "ws"
    cfg = write_config(tmp_path / "search.yml", world, n_init=2, n_total=2, workers=1,
                       algorithm="sobol", limit=4)
    cmd = [sys.executable, "-c", "from mergepipe.cli import main; main()", "--home", str(home),
           "search", "run", str(cfg), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "MERGEPIPE_CRASH_AT": "mid_write"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["failed"] == 2 and final["trials"] == 2 and final["hypervolume"] == 0
    # no terminal: one plain progress line per finished trial instead of a bar
    sid = final["search_id"]
    logged = [l for l in proc.stderr.splitlines() if l.startswith(f"search {sid[:8]} trial ")]
    assert sorted(l.split()[3] for l in logged) == ["0", "1"]
    assert all(" failed on " in l for l in logged)
    with open_catalog(home) as cat:
        trials = cat.rows(sa.select(schema.trials).order_by(schema.trials.c.trial))
        runs = cat.rows(sa.select(schema.runs))
    assert [t["status"] for t in trials] == ["FAILED", "FAILED"]
    assert all((t["f_acc"], t["f_cost"]) == tuple(REF_POINT) for t in trials)
    assert all("died" in t["error"] and t["model_id"] is None for t in trials)
    assert all(r["status"] != "PENDING" for r in runs)
    assert not list((home / "searches" / sid).glob("t*"))


def test_a_trial_that_fails_to_finish_leaves_no_evaluation_rows(tmp_path, world, monkeypatch):
    """Evaluations and the DONE mark commit together: if marking the trial fails after its
    evaluations were written (as a kill there would), none of them may stay behind, or a
    resume would evaluate the same model a second time."""
    from mergepipe.search import trials as trial_rows
    from mergepipe.search.config import SearchConfig
    from mergepipe.search.coordinator import start_search

    real = trial_rows.finish_trial

    def fail_first_done(cat, search_id, trial, *, ok, **kw):
        if ok and trial == 0:
            raise RuntimeError("catalog write failed")
        return real(cat, search_id, trial, ok=ok, **kw)

    monkeypatch.setattr(trial_rows, "finish_trial", fail_first_done)
    cfg = SearchConfig.from_yaml(write_config(tmp_path / "search.yml", world, n_init=2,
                                              n_total=2, workers=1, algorithm="sobol",
                                              limit=4))
    home = tmp_path / "ws"
    with open_catalog(home) as cat:
        summary = start_search(cat, cfg, home, keep_all=True)
        trials = cat.rows(sa.select(schema.trials).order_by(schema.trials.c.trial))
        evaluated = {r["model_id"] for r in cat.rows(sa.select(schema.evaluations.c.model_id))}
        sources = {r["model_id"] for r in cat.rows(
            sa.select(schema.models.c.model_id).where(schema.models.c.kind != "merged"))}
    assert summary["failed"] == 1 and [t["status"] for t in trials] == ["FAILED", "DONE"]
    assert "catalog write failed" in trials[0]["error"]
    assert evaluated - sources == {trials[1]["model_id"]}
    # the failure came after the commit: the model, its run and its lineage stay
    with open_catalog(home) as cat:
        kept = trials[0]["model_id"]
        runs = cat.rows(sa.select(schema.runs).where(schema.runs.c.model_id == kept))
        lineage = cat.rows(sa.select(schema.lineage).where(
            schema.lineage.c.child_model_id == kept))
        plans = {r["plan_id"] for r in cat.rows(sa.select(schema.plans.c.plan_id))}
    assert kept and [r["status"] for r in runs] == ["COMMITTED"]
    assert {l["run_id"] for l in lineage} == {runs[0]["run_id"]} and trials[0]["plan_id"] in plans
    assert Path(runs[0]["out_path"]).is_dir()

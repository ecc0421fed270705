"""The library surface: every call the CLI makes, for scripts and search loops too.

    from mergepipe import api
    with api.open_catalog("./ws") as cat:
        plan = api.build_plan(cat, "ties.yml")
        result = api.apply_plan(cat, plan, "./merged")

Where the work happens: plans in :mod:`mergepipe.planner`, execution in
:mod:`mergepipe.engine`, runs (begin, commit, recover, analyze) in
:mod:`mergepipe.runs`, records in :mod:`mergepipe.catalog`, searches in
:mod:`mergepipe.search`. Heavy modules (torch, transformers, BoTorch) are
imported inside the calls that need them, so a catalog question stays quick.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mergepipe.catalog import DEFAULT_SQL_TIMEOUT

if TYPE_CHECKING:
    from mergepipe.catalog.store import Catalog
    from mergepipe.engine.execute import ExecReport
    from mergepipe.evaluate.runner import EvalResult
    from mergepipe.planner.plan import Plan
    from mergepipe.runs.analyze import AnalyzeReport
    from mergepipe.runs.manifest import VerifyResult
    from mergepipe.runs.recovery import RecoverReport
    from mergepipe.runs.transaction import ApplyResult, RunTicket
    from mergepipe.search.config import SearchConfig

__all__ = ["open_catalog", "workspace_home", "register", "resolve_model", "models", "lineage",
           "run_sql", "DEFAULT_SQL_TIMEOUT", "build_plan", "build_and_store", "store_plan",
           "load_plan", "plan_summary", "plan_lines", "explain", "apply_plan", "begin_run", "execute_plan", "finish_run",
           "abort_run", "check_output", "verify", "recover", "analyze", "world_build", "evaluate",
           "load_search_config", "search_config_keys", "search_algorithms", "start_search", "resume_search", "search_status",
           "search_snapshots", "search_front"]


# -- the catalog --------------------------------------------------------------------
def open_catalog(home: str | Path | None = None, url: str | None = None,
                 read_only: bool = False) -> Catalog:
    """Open the catalog of workspace ``home`` (or the database at ``url``); a context
    manager. A catalog another process writes fails with one line naming it.

    Caps the process's malloc arenas first (:mod:`mergepipe.arenas`): merges
    run after it keep their freed blocks in few arenas."""
    from mergepipe.arenas import limit_malloc_arenas
    from mergepipe.catalog.store import open_catalog as open_
    limit_malloc_arenas()
    return open_(home, url, read_only=read_only)


def workspace_home(home: str | Path | None = None) -> Path:
    """``home``, else $MERGEPIPE_HOME, else ~/.mergepipe."""
    from mergepipe.catalog.store import workspace_home as resolve
    return resolve(home)


def run_sql(cat: Catalog, query: str, timeout: float = DEFAULT_SQL_TIMEOUT) -> list[dict[str, Any]]:
    """One read-only statement (SELECT, EXPLAIN, describing PRAGMAs), timed out."""
    from mergepipe.catalog.sql import run_sql as run
    return run(cat, query, timeout)


def models(cat: Catalog) -> list[dict[str, Any]]:
    """Every registered and merged model, oldest first."""
    from mergepipe.catalog.queries import models as list_models
    return list_models(cat)


def lineage(cat: Catalog, name: str) -> list[dict[str, Any]]:
    """Every ancestry edge of a model, nearest first."""
    from mergepipe.catalog.queries import lineage as walk
    return walk(cat, name)


# -- models -------------------------------------------------------------------
def register(cat: Catalog, path: str | Path, name: str | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Index a model directory or a hub id ``org/name[@revision]`` (idempotent)."""
    from mergepipe.planner.resolve import register_ref
    return register_ref(cat, path, name=name, progress=progress)


def resolve_model(cat: Catalog, ref: str) -> dict[str, Any]:
    """A catalog name, a model directory or a hub id (registered on first use)."""
    from mergepipe.planner.resolve import resolve_model as resolve
    return resolve(cat, ref)


# -- plans ----------------------------------------------------------------------
def build_plan(cat: Catalog, spec: str | Path | dict[str, Any],
               io_budget: str | int | None = None, seed: int | None = None,
               analyze: bool = True, progress: bool = False, store: bool = True) -> Plan:
    """Plan a merge (exact, or under an expert I/O budget) and store it."""
    from mergepipe.runs.apply import build_plan as build
    return build(cat, spec, io_budget, seed, analyze, progress, store)


def build_and_store(cat: Catalog, spec: str | Path | dict[str, Any],
                    io_budget: str | int | None = None, seed: int | None = None,
                    analyze: bool = True, progress: bool = False) -> tuple[Plan, bool]:
    """:func:`build_plan`, also returning whether this call inserted the plan (pass it
    to :func:`apply_plan` as ``plan_inserted`` so a failed run removes it again)."""
    from mergepipe.runs.apply import build_and_store as build
    return build(cat, spec, io_budget, seed, analyze, progress)


def store_plan(cat: Catalog, plan: Plan) -> bool:
    from mergepipe.planner.records import store_plan as store
    return store(cat, plan)


def load_plan(cat: Catalog, plan_id: str) -> Plan:
    from mergepipe.planner.records import load_plan as load
    return load(cat, plan_id)


def plan_summary(plan: Plan) -> dict[str, Any]:
    """A plan's method, sources, estimated reads and writes and budget, as JSON."""
    from mergepipe.planner.explain import summary
    return summary(plan)


def plan_lines(plan: Plan) -> list[str]:
    """The same summary as lines a person reads."""
    from mergepipe.planner.explain import summary_lines
    return summary_lines(plan)


def explain(cat: Catalog, plan_or_run: str) -> dict[str, Any]:
    """What a plan reads per layer and model; for a run id also what the run did.

    Returns ``plan`` (the Plan), ``summary`` (its JSON summary), ``rows`` (per
    layer and model), and ``lines``: the summary, the run against its estimates
    with the engine's seconds per phase, the budget shares and the time estimate.
    """
    from mergepipe.planner.budget_report import report_lines
    from mergepipe.planner.explain import explain_rows, run_lines, summary, summary_lines
    from mergepipe.catalog.queries import find_run
    from mergepipe.runs.manifest import read_manifest
    run = find_run(cat, plan_or_run)
    plan = load_plan(cat, run["plan_id"] if run else plan_or_run)
    lines = summary_lines(plan)
    extra = []
    if run:
        manifest = read_manifest(Path(run["out_path"]))  # phases, if the output is this run's
        phases = (manifest.get("phases") or {}) if manifest.get("run_id") == run["run_id"] else {}
        extra += run_lines(plan, run, phases)
    extra += report_lines(cat, plan, run)
    return {"plan": plan, "summary": summary(plan), "rows": explain_rows(plan),
            "lines": lines, "extra_lines": extra, "run": run}


# -- runs -----------------------------------------------------------------------
def apply_plan(cat: Catalog, plan: Plan, out: str | Path, name: str | None = None,
               overwrite: bool = False, device: str = "cpu", allow_nonfinite: bool = False,
               block_bytes: int | None = None, progress: bool = False,
               plan_inserted: bool = False) -> ApplyResult:
    """Execute a plan transactionally; an already-committed plan returns its commit."""
    from mergepipe.engine.execute import DEFAULT_BLOCK_BYTES
    from mergepipe.runs.apply import apply_plan as apply
    return apply(cat, plan, out, name, overwrite, device, allow_nonfinite,
                 block_bytes or DEFAULT_BLOCK_BYTES, progress, plan_inserted)


def check_output(cat: Catalog, out: str | Path, overwrite: bool = False,
                 name: str | None = None, plan: Plan | None = None,
                 existing_ok: bool = False) -> Path:
    """Refuse, before any work, an output that would destroy data or cannot be recorded."""
    from mergepipe.runs.transaction import check_output as check
    return check(cat, out, overwrite, name, plan, existing_ok)


def begin_run(cat: Catalog, plan: Plan, out: str | Path, overwrite: bool = False,
              plan_inserted: bool = False, device: str = "cpu",
              name: str | None = None) -> RunTicket:
    """Record a PENDING run and make its staging folder (for engines in other processes)."""
    from mergepipe.runs.transaction import begin_run as begin
    return begin(cat, plan, out, overwrite, plan_inserted, device, name)


def execute_plan(plan: Plan, staging: str | Path, **kw: Any) -> ExecReport:
    """Run the engine alone: write the merged shards into ``staging``; no catalog."""
    from mergepipe.engine.execute import execute_plan as execute
    return execute(plan, staging, **kw)


def finish_run(cat: Catalog, plan: Plan, ticket: RunTicket, report: ExecReport,
               name: str | None = None) -> ApplyResult:
    """Commit a run whose engine work is done (possibly in another process)."""
    from mergepipe.runs.transaction import commit_run
    return commit_run(cat, plan, ticket, report, name)


def abort_run(cat: Catalog, ticket: RunTicket) -> None:
    from mergepipe.runs.transaction import abort_run as abort
    abort(cat, ticket)


def verify(path: str | Path) -> VerifyResult:
    """Re-hash an output's tensors and files against its manifest."""
    from mergepipe.runs.manifest import verify_dir
    return verify_dir(path)


def recover(cat: Catalog) -> RecoverReport:
    """Finish or roll back runs a crash interrupted."""
    from mergepipe.runs.recovery import recover as rec
    return rec(cat)


def analyze(cat: Catalog, experts: list[str], base: str, block_size: str | int = "1MiB",
            progress: bool = False, force: bool = False) -> AnalyzeReport:
    """Store per-block delta norms of each expert against ``base`` (names or folders)."""
    from mergepipe.planner.spec import parse_size
    from mergepipe.runs.analyze import analyze as run_analyze
    block_bytes = parse_size(block_size, "block size")
    from mergepipe.planner.resolve import resolve_all
    base_row, *rows = resolve_all(cat, [base, *experts])
    return run_analyze(cat, rows, base_row, block_bytes=block_bytes, progress=progress,
                       force=force)


# -- the tiny world --------------------------------------------------------------
def world_build(size: str = "default", dest: str | Path | None = None, rebuild: bool = False,
                log: bool = False) -> dict[str, Any]:
    """Build (or reuse from the cache) a tiny world; copy it to ``dest`` if given.

    Returns where it is (``dir``, ``cache``), whether it was ``built``, and the
    build's timings in seconds."""
    from mergepipe.world import copy_world, obtain_world
    from mergepipe.world.build import check_world_dest
    if dest:
        check_world_dest(Path(dest))  # before a build of minutes
    path, timings = obtain_world(size, log=log, rebuild=rebuild)
    where = path
    if dest:
        copy_world(path, Path(dest))
        where = Path(dest).resolve()
    return {"size": size, "dir": str(where), "cache": str(path), "built": bool(timings),
            **{k: round(v, 2) for k, v in timings.items()}}


# -- evaluation -----------------------------------------------------------------
def evaluate(cat: Catalog, model: str, task: str | Path, limit: int | None = None,
             backend: str = "transformers", device: str | None = "auto",
             max_new_tokens: int = 128, batch_size: int = 64,
             log: bool = False) -> tuple[dict[str, Any], EvalResult]:
    """Score a model (name or folder) on a task (JSONL path or built-in world split)
    and record the metrics in the catalog's evaluations table.

    Cheap checks come first: a task file is read before the model is looked up,
    and a missing model fails before a world (minutes) is built. A failure after
    the lookup unregisters a folder this call registered."""
    from mergepipe.evaluate import evaluate_model
    from mergepipe.runs.apply import forget_fresh_models
    from mergepipe.world.tasks import names_a_file, resolve_task
    t = resolve_task(task, log=log).head(limit) if names_a_file(task) else None
    before = list(cat.fresh_models)
    row = resolve_model(cat, model)
    try:
        if t is None:
            t = resolve_task(task, log=log).head(limit)
        res = evaluate_model(row["path"], t, device=device, max_new_tokens=max_new_tokens,
                             backend=backend, batch_size=batch_size)
    except BaseException:
        forget_fresh_models(cat, before)
        raise
    cat.record_evaluation(row["model_id"], res.task, res.metrics(), res.n, res.backend,
                          split=res.split, wall_s=res.wall_s)
    return row, res


# -- search ---------------------------------------------------------------------
def load_search_config(path: str | Path) -> SearchConfig:
    from mergepipe.search.config import SearchConfig
    return SearchConfig.from_yaml(path)


def search_config_keys() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every search config key; quick (no torch), for --help."""
    from mergepipe.search.config import config_keys
    return config_keys()


def search_algorithms() -> dict[str, str]:
    """Every search algorithm's name and what it does; quick (no torch), for --help."""
    from mergepipe.search.config import ALGORITHM_HELP
    return dict(ALGORITHM_HELP)


def start_search(cat: Catalog, config: str | Path | SearchConfig, home: str | Path | None = None,
                 progress: bool = False, keep_all: bool = False,
                 on_start: Callable[[str], None] | None = None, **kw: Any) -> dict[str, Any]:
    """Run a search (a config file or object) to its end; returns its summary.

    Checkpoints go under ``home``/searches (default: the workspace)."""
    from mergepipe.search.coordinator import start_search as start
    cfg = load_search_config(config) if isinstance(config, (str, Path)) else config
    return start(cat, cfg, workspace_home(home), progress=progress, keep_all=keep_all,
                 on_start=on_start, **kw)


def resume_search(cat: Catalog, search_id: str, home: str | Path | None = None,
                  progress: bool = False, **kw: Any) -> dict[str, Any]:
    """Continue an interrupted search: finished trials are kept, in-flight ones re-run."""
    from mergepipe.search.coordinator import resume_search as resume
    return resume(cat, search_id, workspace_home(home), progress=progress, **kw)


def search_status(cat: Catalog, search_id: str | None = None) -> list[dict[str, Any]]:
    """Trials, hypervolume and utilisation of one search (or every search).

    The summary the coordinator stored is used while the trial rows are as it saw
    them (no torch needed); otherwise it is computed again from the rows."""
    from mergepipe.search import trials
    ids, fresh = trials.stored_summaries(cat, search_id)
    if search_id is not None and len(ids) != 1:
        trials.get_search(cat, search_id)  # says: no such search, or an ambiguous prefix
    stale = [i for i in ids if i not in fresh]
    if stale:
        from mergepipe.search.report import summarise
        fresh.update({i: json_ready(summarise(cat, i)) for i in stale})
    return [fresh[i] for i in ids]


def json_ready(doc: dict[str, Any]) -> dict[str, Any]:
    """A summary as stored (timestamps as text), so fresh and stored ones print alike."""
    import json
    return json.loads(json.dumps(doc, default=str))


def search_snapshots(home: str | Path | None = None,
                     search_id: str | None = None) -> list[dict[str, Any]]:
    """The status files running coordinators publish beside their checkpoints: what
    `search status` shows while a running search holds the catalog."""
    import json
    out = []
    for f in sorted((workspace_home(home) / "searches").glob("*/status.json")):
        doc = json.loads(f.read_text())
        if search_id is None or doc["search_id"].startswith(search_id):
            out.append(doc)
    return sorted(out, key=lambda d: str(d.get("created_at")))


def search_front(cat: Catalog, search_id: str, materialize: bool = False,
                 home: str | Path | None = None, plot: str | None = None,
                 hv_plot: str | None = None) -> list[dict[str, Any]]:
    """The Pareto set as named models (re-created on disk with ``materialize``);
    optionally writes the Pareto and hypervolume-over-time plots (PNG)."""
    from mergepipe.search.harvest import front_models, write_plots
    rows = front_models(cat, search_id, materialize=materialize, home=workspace_home(home))
    if plot or hv_plot:
        write_plots(cat, search_id, plot, hv_plot)
    return rows

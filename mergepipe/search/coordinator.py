"""The search coordinator: the one process that owns the catalog and drives the workers.

The loop is short on purpose: whenever workers are free, give them the next
point (a requeued trial, a fixed design point, or a fresh proposal with every
in-flight candidate as pending, or, when that proposal was chosen on an
out-of-date history, a point the algorithm computes on the spot); then wait for
any result, commit it, record it and garbage-collect what fell off the Pareto
front. The synchronous baseline differs in one place: it proposes only when
nothing is in flight.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from mergepipe.catalog.store import Catalog, now
from mergepipe.errors import MergePipeError
from mergepipe.planner.resolve import resolve_model
from mergepipe.runs.apply import build_and_store
from mergepipe.runs.recovery import recover
from mergepipe.runs.transaction import abort_run, begin_run, commit_run, committed_result
from mergepipe.search import trials
from mergepipe.search.algorithms import Algorithm, make_algorithm
from mergepipe.search.anchors import ensure_anchors, task_refs
from mergepipe.search.config import SearchConfig
from mergepipe.search.jobs import EvaluateJob, MergeEvaluateJob, stretch_factor
from mergepipe.search.objectives import REF_POINT, Anchors, hypervolume, pareto_mask
from mergepipe.search.prior_build import ensure_prior
from mergepipe.search.proposer import Proposer, canonical_history, propose_points
from mergepipe.search.rerank import unseen
from mergepipe.search.report import session_of, summarise
from mergepipe.search.resident import ResidentJob
from mergepipe.search.sharing import combine, slot_of
from mergepipe.search.space import LayerSpace
from mergepipe.search.workers import LocalPool, TrialResult, WorkerPool


@dataclass
class InFlight:
    x: list[float]
    plan: Any
    ticket: Any | None            # None when an existing commit is only re-evaluated
    model_id: str | None = None
    worker: str | None = None     # the owner
    job: Any = None               # what the owner runs; helpers run a copy
    slot: int | None = None       # the trial's shared unit counter, if the pool has them
    jobs: int = 1                 # jobs of this trial still out (owner and helpers)
    parts: list[TrialResult] = field(default_factory=list)


def make_pool(kind: str, size: int, prefix: str, ray_address: str | None = None) -> WorkerPool:
    """The pool a search config names: ``local`` processes or ``ray`` actors."""
    if kind == "ray":
        from mergepipe.search.ray_pool import RayPool   # ray is an optional extra
        return RayPool(size, prefix, ray_address)
    return LocalPool(size, prefix)


def search_root(home: Path, search_id: str, cfg: SearchConfig) -> Path:
    return Path(cfg.out_dir).expanduser() / search_id if cfg.out_dir else \
        Path(home) / "searches" / search_id


class SearchRun:
    """One coordinator session of a search (a fresh start or a resume)."""

    def __init__(self, cat: Catalog, search_id: str, home: Path, progress: bool = False,
                 keep_all: bool | None = None, lines: bool = False,
                 pool_factory: Callable[[int, str], WorkerPool] | None = None):
        self.cat = cat
        row = trials.get_search(cat, search_id)
        self.sid = row["search_id"]
        self.row = row
        self.cfg = SearchConfig.from_dict(row["config"])
        self.keep_all = self.cfg.keep_all if keep_all is None else keep_all
        self.root = search_root(home, self.sid, self.cfg)
        self.progress = progress
        self.lines = lines        # one plain line per finished trial (no terminal for a bar)
        self.pool_factory = pool_factory or self._default_pool
        self.inflight: dict[int, InFlight] = {}
        self.collected: set[int] = set()
        self.failed: set[int] = set()   # trials that failed in this session
        self.busy_s: list[float] = []   # evaluation times seen in this session

    # -- setup ------------------------------------------------------------
    def _default_pool(self, size: int, prefix: str) -> WorkerPool:
        return make_pool(self.cfg.pool, size, prefix, self.cfg.ray_address)

    def _session(self, rows: list[dict[str, Any]]) -> str:
        seen = {session_of(r["worker"]) for r in rows if r["worker"]}
        return f"s{len(seen) + 1}"

    def _setup(self, pool: WorkerPool) -> None:
        cfg = self.cfg
        self.base = resolve_model(self.cat, cfg.base)
        self.reasoning = resolve_model(self.cat, cfg.reasoning)
        layers = int(self.base["num_layers"] or 0)
        if layers < 1:
            raise RuntimeError(f"model {self.base['name']} has no transformer layers indexed")
        self.space = LayerSpace(layers, cfg.group_size)
        self.tasks = task_refs(cfg)
        resident = cfg.evaluator == "resident"   # sources scored in the trials' engines
        self.anchors: Anchors = ensure_anchors(self.cat, self.sid, self.row, self.base,
                                               self.reasoning, self.tasks, cfg.device, pool,
                                               backend=cfg.backend,
                                               engine_dir=self.base["path"] if resident else None)
        lengthscales = None
        if cfg.algorithm == "apbmm":
            lengthscales = ensure_prior(self.cat, self.sid, self.row, self.base, self.reasoning,
                                        self.space, cfg)["lengthscales"]
        self.alg: Algorithm = make_algorithm(cfg.algorithm, self.space, cfg.n_init, cfg.n_total,
                                             cfg.seed, lengthscales)

    # -- the loop ---------------------------------------------------------
    def run(self) -> dict[str, Any]:
        torch.set_num_threads(1)  # the workers need the cores more than the GP does
        recover(self.cat)     # settle runs a killed session left PENDING
        rows = trials.list_trials(self.cat, self.sid)
        session = self._session(rows)
        pool = self.pool_factory(self.cfg.workers, f"{session}.w")
        try:
            self._setup(pool)
            pool.wait_ready()   # the workers' start-up overlaps the setup, not the trials
            self._loop(pool)
        except BaseException:
            for trial, inf in self.inflight.items():
                if inf.ticket is not None:
                    abort_run(self.cat, inf.ticket)
            self.inflight.clear()
            raise
        finally:
            pool.close()
        trials.update_search(self.cat, self.sid, status="FINISHED", finished_at=now())
        summary = summarise(self.cat, self.sid)
        write_snapshot(self.root, summary)
        trials.store_summary(self.cat, self.sid, summary)
        return summary

    def _loop(self, pool: WorkerPool) -> None:
        """Hand out work first, record afterwards, and let the proposer run beside both."""
        rows = trials.list_trials(self.cat, self.sid)
        requeue = deque((r["trial"], r["x"]) for r in trials.interrupted_trials(self.cat, self.sid))
        finished = [r for r in rows if r["status"] in trials.FINISHED]
        self.next_trial = max([r["trial"] for r in rows], default=-1) + 1
        self.X = [r["x"] for r in finished]
        self.Y = [[r["f_acc"], r["f_cost"]] for r in finished]
        bar = tqdm(total=self.cfg.n_total, initial=len(finished), file=sys.stderr,
                   disable=not self.progress, desc=f"search {self.sid[:8]}", unit="trial")
        self._collect_garbage(rows)
        # fixed points are a prefix of the trials: past it, the algorithm must propose
        proposes = self.alg.fixed_point(self.cfg.n_total - 1) is None
        proposer = Proposer(self.alg) if proposes and not self.alg.synchronous else None
        ready: list[list[float]] = []     # the newest batch, not yet handed out
        asked = -1                        # history size the newest batch was requested on
        ready_on = -1                     # history size the ready points were chosen on
        promised: set[int] = set()        # ready points the batch being computed counts on
        unrecorded: list[TrialResult] = []   # finished, still in self.inflight until recorded
        try:
            while True:
                free = pool.free()
                while free and requeue:
                    trial, x = requeue.popleft()
                    self._dispatch(pool, trial, x, free.pop(0))
                while free and self.next_trial < self.cfg.n_total:
                    x = self.alg.fixed_point(self.next_trial)
                    if x is None:
                        break
                    self._dispatch(pool, self.next_trial, x, free.pop(0))
                    self.next_trial += 1
                if proposer is not None:
                    batch = proposer.take()
                    if batch is not None:         # fresher than the rest of the last batch,
                        kept = [x for x in ready if id(x) in promised]
                        ready = kept + unseen(batch[1], self._taken() + kept)
                        ready_on = batch[0]
                        promised = set()          # but not than the points it counted on
                    while free and ready and self.next_trial < self.cfg.n_total:
                        x = self._next_point(ready, ready_on)
                        if x is None:
                            break
                        self._dispatch(pool, self.next_trial, x, free.pop(0))
                        self.next_trial += 1
                elif proposes and free and not self.inflight and \
                        self.next_trial < self.cfg.n_total:   # a synchronous batch
                    n = min(len(free), self.cfg.n_total - self.next_trial)
                    for x in self._propose(n):
                        self._dispatch(pool, self.next_trial, x, free.pop(0))
                        self.next_trial += 1
                looked: dict[int, bool] | None = None     # this pass's survey of the board
                if free and pool.board is not None:   # nothing new to run: help a slow one
                    looked = self._share(pool, free)
                for share in unrecorded:          # the freed workers already have new work
                    r = self._gather(share)
                    if r is None:                 # other shares of the trial are still out
                        continue
                    self._record(r, self.inflight.pop(r.trial))
                    if r.ok:
                        self.busy_s.append(r.busy_s)
                    bar.update(1)
                    bar.set_postfix(hv=f"{hypervolume(self.Y):.4f}")
                    if self.lines:
                        print(self._progress_line(r), file=sys.stderr, flush=True)
                if unrecorded:
                    self._snapshot()
                unrecorded = []
                more = self.next_trial < self.cfg.n_total
                if proposer is not None and more and not proposer.busy and \
                        (len(self.Y) != asked or not ready):
                    ahead = self._lookahead(pool.size, proposer.last_s, len(ready))
                    n = min(pool.size + ahead, self.cfg.n_total - self.next_trial - ahead)
                    if n > 0:
                        asked = len(self.Y)
                        pending = [i.x for i in self.inflight.values()] + ready[:ahead]
                        promised = {id(x) for x in ready[:ahead]}
                        proposer.request(self.X, self.Y, pending, n, self.next_trial + ahead,
                                         asked)
                if not self.inflight:
                    if not more:
                        break
                    if proposer is not None:      # nothing runs: only the proposer can help
                        batch = proposer.take(block=True)
                        if batch is not None:
                            ready, ready_on = unseen(batch[1], self._taken()), batch[0]
                    continue
                waiting_on_proposer = proposer is not None and proposer.busy and pool.free()
                poll = waiting_on_proposer or self._may_share(pool, looked)
                unrecorded = pool.wait(timeout=0.05 if poll else None)
        finally:
            if proposer is not None:
                proposer.close()
            bar.close()

    def _next_point(self, ready: list[list[float]], ready_on: int) -> list[float] | None:
        """What a freed worker runs next: the ready batch's first point, unless that batch
        was chosen on a history more than MAX_LAG results old; then a point the
        algorithm computes at once on the newest one comes first, if it has one
        (AP-BMM: the midpoint across the front's largest gap, see ``immediate``).

        When a refit takes as long as several evaluations (the tiny world), workers
        kept busy from the ready batch run points chosen without the latest results:
        measured on the default world, that cost AP-BMM about 0.02 of hypervolume
        against the same algorithm run in synchronous batches. A point that needs no
        refit keeps the worker busy and uses every result already in. Ready points
        that repeat one handed out since are dropped (returns None if none is left).
        """
        taken = self._taken()
        if len(self.Y) - ready_on > MAX_LAG:
            now = canonical_history(self.alg.dim, self.X, self.Y)
            fresh = unseen(self.alg.immediate(now), taken)
            if fresh:
                return fresh[0]
        while ready:
            x = ready.pop(0)
            if unseen([x], taken):
                return x
        return None

    def _taken(self) -> list[list[float]]:
        """Every point finished or in flight (a proposal must not repeat one)."""
        return self.X + [i.x for i in self.inflight.values()]

    def _lookahead(self, workers: int, refit_s: float, ready: int) -> int:
        """Ready points the workers will take while the next batch is computed.

        They count as pending for that batch (they will be in flight when it
        lands), and the batch is that much larger, so the workers do not run dry
        when evaluations are faster than a refit.
        """
        if not self.busy_s or refit_s <= 0:
            return 0
        typical = sorted(self.busy_s)[len(self.busy_s) // 2]
        expected = math.ceil(workers * refit_s / max(typical, 1e-3))
        return min(ready, expected, MAX_LOOKAHEAD * workers)

    def _progress_line(self, r: TrialResult) -> str:
        """What a log file gets per finished trial: outcome, objectives, front so far."""
        f_acc, f_cost = self.Y[-1]
        head = f"search {self.sid[:8]} trial {r.trial} ({len(self.Y)}/{self.cfg.n_total})"
        where = r.worker + (f" and {r.shares - 1} helper{'s' * (r.shares > 2)}"
                            if r.shares > 1 else "")
        if r.trial in self.failed:
            return f"{head} failed on {where} after {r.busy_s:.1f}s"
        return (f"{head} done on {where} in {r.busy_s:.1f}s: f_acc {f_acc:.4f} "
                f"f_cost {f_cost:.4f}, hypervolume {hypervolume(self.Y):.4f}")

    # -- shared evaluations -------------------------------------------------
    def _share(self, pool: WorkerPool, free: list[str]) -> dict[int, bool]:
        """Send each free worker to the in-flight trial with the most unclaimed units.

        A helper pays a model load (or an in-memory merge) before its first unit, so
        it only goes where at least as many units are unclaimed as jobs are already on
        the trial (each of those claims one next). Returns what the survey said per
        trial (may a helper yet find units there), which :meth:`_may_share` reuses in
        the same pass instead of asking the board again.
        """
        board = pool.board
        assert board is not None
        shared = {t: i for t, i in self.inflight.items() if i.slot is not None}
        left = board.survey([i.slot for i in shared.values()])
        spare = {t: n - i.jobs for (t, i), (n, _) in zip(shared.items(), left)}
        while free:
            trial = max(spare, key=lambda t: (spare[t], -t), default=None)
            if trial is None or spare[trial] < 0:
                break
            inf = self.inflight[trial]
            pool.submit(free.pop(0), trial, replace(inf.job, helper=True))
            inf.jobs += 1
            spare[trial] -= 1
        return {t: may for t, (_, may) in zip(shared, left)}

    def _may_share(self, pool: WorkerPool, looked: dict[int, bool] | None = None) -> bool:
        """Whether a free worker may yet find units to take (so the loop must look again).

        ``looked`` is this pass's survey from :meth:`_share`, if it made one. Since
        then trials have only been recorded, never handed out, so it still holds for
        the trials left in flight.
        """
        board = pool.board
        if board is None or not pool.free():
            return False
        if looked is not None:
            return any(may for t, may in looked.items() if t in self.inflight)
        slots = [i.slot for i in self.inflight.values() if i.slot is not None]
        return bool(slots) and any(may for _, may in board.survey(slots))

    def _gather(self, share: TrialResult) -> TrialResult | None:
        """The trial's result once all its units are back (or a share failed); else None."""
        inf = self.inflight.get(share.trial)
        if inf is None:          # a late helper of a trial already recorded
            return None
        inf.jobs -= 1
        inf.parts.append(share)
        parts = inf.parts
        ok = all(p.ok for p in parts)
        owner = next((p for p in parts if p.worker == inf.worker), None)
        if ok and inf.jobs and (owner is None or sum(len(p.value["units"]) for p in parts)
                                < max(p.value["n_units"] for p in parts)):
            return None          # the owner (it holds the merge report) or units still out
        owner = owner or parts[0]
        result = TrialResult(share.trial, owner.worker, ok, {},
                             next((p.error for p in parts if not p.ok), None),
                             min(p.started for p in parts), max(p.finished for p in parts),
                             work_s=sum(p.busy_s for p in parts), shares=len(parts))
        if ok:
            try:
                result.value = {"metrics": combine([p.value for p in parts], self.tasks),
                                "report": owner.value.get("report")}
            except MergePipeError as exc:
                result.ok, result.error = False, str(exc)
        return result

    def _propose(self, n: int) -> list[list[float]]:
        return propose_points(self.alg, self.X, self.Y, [i.x for i in self.inflight.values()],
                              n, self.next_trial)

    # -- one trial --------------------------------------------------------
    def _dispatch(self, pool: WorkerPool, trial: int, x: list[float], worker: str) -> None:
        spec = self.alg.spec(x, self.base["name"], self.reasoning["name"])
        plan, inserted = build_and_store(self.cat, spec, io_budget=self.cfg.io_budget)
        out = self.root / f"t{trial:04d}"
        stretch = stretch_factor(self.cfg.seed, trial, self.cfg.stretch_alpha)
        existing = None if self.cfg.evaluator == "resident" else \
            committed_result(self.cat, plan, out)
        if self.cfg.evaluator == "resident":   # nothing on disk: the plan id is the record
            inf = InFlight(list(x), plan, None)
            job: Any = ResidentJob(plan, self.base["path"], self.tasks, self.cfg.device,
                                   self.cfg.backend, stretch)
        elif existing is not None and Path(existing.out) == out.resolve():
            inf = InFlight(list(x), plan, None, existing.model_id)  # committed before a crash
            job = EvaluateJob(str(out), self.tasks, self.cfg.device, stretch, self.cfg.backend)
        else:
            if out.exists():  # an uncommitted leftover (e.g. collected garbage); start clean
                shutil.rmtree(out)
            ticket = begin_run(self.cat, plan, out, plan_inserted=inserted,
                               device=self.cfg.device)
            inf = InFlight(list(x), plan, ticket)
            job = MergeEvaluateJob(plan, ticket.staging, self.tasks, self.cfg.device, stretch,
                                   self.cfg.backend)
        if pool.board is not None:
            inf.slot = slot_of(trial)
            pool.board.arm(inf.slot)
            job.slot = inf.slot
        inf.job, inf.worker = job, worker
        trials.submit_trial(self.cat, self.sid, trial, x, plan.plan_id, worker)
        self.inflight[trial] = inf
        pool.submit(worker, trial, job)

    def _record(self, r: TrialResult, inf: InFlight) -> None:
        error = r.error
        model_id = inf.model_id
        if r.ok:
            try:
                if inf.ticket is not None:
                    res = commit_run(self.cat, inf.plan, inf.ticket, r.value["report"],
                                         name=f"search-{self.sid[:8]}-t{r.trial:03d}")
                    inf.ticket, model_id = None, res.model_id  # committed: never undone
                metrics = r.value["metrics"]
                f = self.anchors.objectives(metrics)
                k = len(metrics)
                # one transaction: a kill can never leave evaluations of a trial that resume
                # would run again
                with self.cat.transaction():
                    # a resident trial has no model until its plan is materialised: the
                    # trial row (plan id, accuracy, mean tokens) is its record
                    for task, m in (metrics.items() if model_id else ()):
                        self.cat.record_evaluation(model_id, task, {
                            "accuracy": m["accuracy"], "mean_tokens": m["mean_tokens"]},
                            n=m["n"], backend=m["backend"], split="test", wall_s=m["wall_s"])
                    trials.finish_trial(
                        self.cat, self.sid, r.trial, ok=True, objectives=f, started=r.started,
                        finished=r.finished, busy_s=r.busy_s, model_id=model_id,
                        accuracy=sum(m["accuracy"] for m in metrics.values()) / k,
                        mean_tokens=sum(m["mean_tokens"] for m in metrics.values()) / k)
                self.X.append(inf.x)
                self.Y.append(list(f))
                self._collect_garbage(trials.list_trials(self.cat, self.sid))
                return
            except Exception as exc:  # commit or scoring failed: the trial fails, search goes on
                error = f"{type(exc).__name__}: {exc}"
        if inf.ticket is not None:  # only a run that never committed is rolled back
            abort_run(self.cat, inf.ticket)
        # a model committed before the failure stays, with its lineage, and the trial names it
        trials.finish_trial(self.cat, self.sid, r.trial, ok=False, objectives=REF_POINT,
                           started=r.started, finished=r.finished, busy_s=r.busy_s,
                           model_id=model_id,
                           error=(error or "")[:4000])
        self.failed.add(r.trial)
        self.X.append(inf.x)
        self.Y.append(list(REF_POINT))

    def _snapshot(self) -> None:
        """Status for readers while this process holds the catalog (DuckDB admits one)."""
        summary = summarise(self.cat, self.sid)
        write_snapshot(self.root, summary)
        trials.store_summary(self.cat, self.sid, summary)

    def _collect_garbage(self, rows: list[dict[str, Any]]) -> None:
        """Delete merged checkpoints that are off the Pareto front (unless keep_all)."""
        if self.keep_all:
            return
        done = [r for r in rows if r["status"] == "DONE"]
        if not done:
            return
        sources = [list(p) for p in self.anchors.source_points()]
        points = sources + [[r["f_acc"], r["f_cost"]] for r in done]
        mask = pareto_mask(points).tolist()[len(sources):]
        for r, on_front in zip(done, mask):
            out = self.root / f"t{r['trial']:04d}"
            if not on_front and r["trial"] not in self.collected:
                shutil.rmtree(out, ignore_errors=True)
                self.collected.add(r["trial"])


SNAPSHOT = "status.json"
MAX_LAG = 2   # results a ready batch may miss before a point computed on the spot goes first
MAX_LOOKAHEAD = 3   # batches never plan more than this many rounds of the pool ahead


def write_snapshot(root: Path, summary: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{SNAPSHOT}.tmp"
    tmp.write_text(json.dumps(summary, default=str))
    os.replace(tmp, root / SNAPSHOT)


def start_search(cat: Catalog, cfg: SearchConfig, home: Path, progress: bool = False,
                 keep_all: bool = False, on_start: Callable[[str], None] | None = None,
                 **kw: Any) -> dict[str, Any]:
    """Create the search row and run it to the end; returns the summary.

    ``on_start`` gets the search id before the first trial (to resume it by)."""
    cfg.keep_all = keep_all or cfg.keep_all
    sid = trials.create_search(cat, cfg.algorithm, cfg.to_json())
    if on_start is not None:
        on_start(sid)
    return SearchRun(cat, sid, home, progress=progress, **kw).run()


def resume_search(cat: Catalog, search_id: str, home: Path, progress: bool = False,
                  **kw: Any) -> dict[str, Any]:
    """Continue a search from its catalog rows; a finished search just reports."""
    row = trials.get_search(cat, search_id)
    if row["status"] == "FINISHED":
        return summarise(cat, row["search_id"])
    trials.update_search(cat, row["search_id"], status="RUNNING")
    return SearchRun(cat, row["search_id"], home, progress=progress, **kw).run()

"""Evaluators as Ray actors, for searches that need more than one machine.

The same shape as :class:`~mergepipe.search.workers.LocalPool` (``free`` /
``submit`` / ``wait`` / ``close``): one actor per worker name, each a long-lived
process, so a resident evaluator keeps its engine across trials exactly as a
local worker does. The coordinator alone writes the catalog; actors only run
jobs and return :class:`TrialResult`s. An actor that dies fails its trial and is
replaced. Actors share no memory, so the claim counters that let a free
evaluator help a slow one (:mod:`mergepipe.search.sharing`) live in one more,
CPU-less actor that every evaluator and the coordinator call.
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Sequence

from mergepipe.errors import MergePipeError
from mergepipe.search.sharing import ClaimBoard
from mergepipe.search.workers import WARM_MODULES, Job, TrialResult, warm_imports


class RayBoard:
    """The :class:`~mergepipe.search.sharing.Board` of a Ray pool: a
    :class:`~mergepipe.search.sharing.ClaimBoard` in an actor of its own. Each call
    is one round trip to it (a millisecond next to a generation batch), and the
    actor runs its calls one at a time, so two claims never get the same unit."""

    def __init__(self, counters: Any) -> None:
        self._counters = counters     # an actor handle: picklable, usable from any actor

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        return ray.get(getattr(self._counters, method).remote(*args))

    def arm(self, slot: int) -> None:
        self._call("arm", slot)

    def count(self, slot: int, units: int) -> None:
        self._call("count", slot, units)

    def claim(self, slot: int) -> int:
        return int(self._call("claim", slot))

    def left(self, slot: int) -> int:
        return int(self._call("left", slot))

    def survey(self, slots: Sequence[int]) -> list[tuple[int, bool]]:
        return [(int(n), bool(m)) for n, m in self._call("survey", list(slots))]


class _Evaluator:
    """The actor body: runs one job at a time in its own process."""

    def __init__(self, name: str, board: RayBoard | None = None) -> None:
        import os
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch
        torch.set_num_threads(1)
        from mergepipe.evaluate.hf import silence_transformers
        from mergepipe.search import sharing
        silence_transformers()
        warm_imports(WARM_MODULES)
        sharing.BOARD = board
        self.name = name

    def ready(self) -> bool:
        """Answered once the constructor (imports included) has run."""
        return True

    def run(self, trial: int, job: Job) -> TrialResult:
        started = time.time()
        try:
            return TrialResult(trial, self.name, True, job.run(), None, started, time.time())
        except Exception as exc:   # a failing job is a FAILED trial, not a dead actor
            tb = traceback.format_exc(limit=3)
            return TrialResult(trial, self.name, False, {}, f"{type(exc).__name__}: {exc}\n{tb}",
                               started, time.time())


class RayPool:
    """``size`` Ray actors; starts a local Ray instance unless ``address`` names a cluster."""

    def __init__(self, size: int, prefix: str = "w", address: str | None = None):
        try:
            import ray
        except ImportError:
            raise MergePipeError("pool: ray needs the optional `ray` package "
                                 "(pip install 'mergepipe[ray]')")
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, Any] = {"address": address} if address else {
                "num_cpus": size, "object_store_memory": 200 << 20}
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        self.size = size
        # a free evaluator helps a slow one through counters in an actor of their own;
        # it takes no CPU, so it never holds back an evaluator's placement
        self._counters = ray.remote(num_cpus=0, max_restarts=-1,
                                    max_task_retries=-1)(ClaimBoard).remote()
        self.board = RayBoard(self._counters)
        self._cls = ray.remote(num_cpus=1, max_restarts=0)(_Evaluator)
        self._names = [f"{prefix}{i}" for i in range(size)]
        self._actors = {n: self._cls.remote(n, self.board) for n in self._names}
        self._busy: dict[str, tuple[int, float, Any]] = {}   # worker -> (trial, t0, ref)

    def free(self) -> list[str]:
        return [n for n in self._names if n not in self._busy]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every actor has been constructed (imports included), or ``timeout``;
        an actor that failed to start shows up when its first trial runs."""
        refs = [actor.ready.remote() for actor in self._actors.values()]
        self._ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def submit(self, worker: str, trial: int, job: Job) -> None:
        if worker in self._busy:
            raise RuntimeError(f"worker {worker} is busy with trial {self._busy[worker][0]}")
        self._busy[worker] = (trial, time.time(), self._actors[worker].run.remote(trial, job))

    def wait(self, timeout: float | None = None) -> list[TrialResult]:
        """Block until at least one job finishes (or ``timeout``); return all that did."""
        ray = self._ray
        if not self._busy:
            return []
        by_ref = {ref: w for w, (_, _, ref) in self._busy.items()}
        done, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if done:
            done, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        out = []
        for ref in done:
            worker = by_ref[ref]
            trial, t0, _ = self._busy.pop(worker)
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as exc:   # killed (OOM, signal, node lost)
                out.append(TrialResult(trial, worker, False, {},
                                       f"worker {worker} died ({type(exc).__name__})",
                                       t0, time.time()))
                self._actors[worker] = self._cls.remote(worker, self.board)
        return out

    def close(self) -> None:
        for actor in [*self._actors.values(), self._counters]:
            try:
                self._ray.kill(actor)
            except Exception:
                pass
        if self._owns:
            self._ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Evaluator workers: processes that run one trial job at a time and report back.

Workers never touch the catalog (DuckDB admits one writer, and a cluster
worker may not reach it at all): a job carries everything it needs, and the
coordinator records what comes back. Anything with ``free``/``submit``/``wait``
/``close`` can stand in for :class:`LocalPool` — one Ray actor per GPU fits the
same shape, with ``wait`` built on ``ray.wait``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

from mergepipe.search.sharing import Board, ClaimBoard


class Job(Protocol):
    """A picklable unit of work; ``run`` executes inside the worker process."""

    def run(self) -> dict[str, Any]: ...


@dataclass
class TrialResult:
    """One finished job: its value or its error, and when the worker was busy."""

    trial: int
    worker: str
    ok: bool
    value: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    started: float = 0.0          # epoch seconds, measured in the worker
    finished: float = 0.0
    work_s: float | None = None   # worker seconds, when shared by several workers
    shares: int = 1               # jobs the result adds up (owner and helpers)

    @property
    def busy_s(self) -> float:
        return self.work_s if self.work_s is not None else max(0.0, self.finished - self.started)


class WorkerPool(Protocol):
    """What the coordinator needs from a set of evaluators."""

    size: int
    board: Board | None           # shared unit counters, None where workers cannot share

    def free(self) -> list[str]: ...

    def wait_ready(self, timeout: float = 120.0) -> None: ...

    def submit(self, worker: str, trial: int, job: Job) -> None: ...

    def wait(self, timeout: float | None = None) -> list[TrialResult]: ...

    def close(self) -> None: ...


def _worker_main(name: str, inbox: "mp.Queue[Any]", outbox: "mp.Queue[Any]",
                 warm: tuple[str, ...], ready: Any, board: Any = None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from mergepipe.search import sharing
    sharing.BOARD = board
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch  # imported here so the parent's thread settings don't leak in
    torch.set_num_threads(1)
    # below the coordinator: its short turns (record a result, hand out the next point)
    # must not queue for a core behind the evaluations it feeds
    os.nice(WORKER_NICE)
    from mergepipe.evaluate.hf import silence_transformers
    silence_transformers()
    warm_imports(warm)
    ready.set()
    parent = os.getppid()
    while True:
        try:
            msg = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the coordinator was killed: don't linger as an orphan
                return
            continue
        if msg is None:
            return
        trial, job = msg
        started = time.time()
        try:
            value = job.run()
            outbox.put(TrialResult(trial, name, True, value, None, started, time.time()))
        except BaseException as exc:  # report every failure; the trial becomes a FAILED row
            tb = traceback.format_exc(limit=3)
            outbox.put(TrialResult(trial, name, False, {}, f"{type(exc).__name__}: {exc}\n{tb}",
                                   started, time.time()))


WORKER_NICE = 5
# what a trial imports: the engine, the evaluators and transformers' Llama classes
# (6 s of imports on a 2-core machine, four times the tiny world's evaluation)
WARM_MODULES = ("mergepipe.engine.execute", "mergepipe.evaluate", "mergepipe.evaluate.hf",
                "transformers.models.auto.modeling_auto",
                "transformers.models.auto.tokenization_auto",
                "transformers.models.llama.modeling_llama")


def warm_imports(modules: tuple[str, ...]) -> None:
    """Pay the import cost once at start-up, not inside the first trial's busy time."""
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            pass


class LocalPool:
    """``size`` spawned processes on this machine, one inbox each, one shared outbox."""

    def __init__(self, size: int, prefix: str = "w", warm: tuple[str, ...] = WARM_MODULES):
        if size < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.size = size
        self._warm = tuple(warm)
        self._ctx = mp.get_context("spawn")
        self._outbox: "mp.Queue[Any]" = self._ctx.Queue()
        self._names = [f"{prefix}{i}" for i in range(size)]
        self._procs: dict[str, Any] = {}
        self._inboxes: dict[str, Any] = {}
        self._busy: dict[str, tuple[int, float]] = {}     # worker -> (trial, submit time)
        self._ready: dict[str, Any] = {}                  # worker -> set once it has warmed up
        # shared unit counters: free workers can take units of a slow evaluation
        self.board: ClaimBoard | None = ClaimBoard(self._ctx)
        for n in self._names:
            self._spawn(n)

    def _spawn(self, name: str) -> None:
        inbox, ready = self._ctx.Queue(), self._ctx.Event()
        proc = self._ctx.Process(target=_worker_main,
                                 args=(name, inbox, self._outbox, self._warm, ready,
                                       self.board),
                                 name=f"mergepipe-search-{name}", daemon=True)
        proc.start()
        self._procs[name], self._inboxes[name], self._ready[name] = proc, inbox, ready

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every worker has started and warmed up (or died, or ``timeout``),
        so the first trials measure evaluation, not process start-up."""
        deadline = time.time() + timeout
        for n in self._names:
            while not self._ready[n].wait(timeout=0.5):
                if not self._procs[n].is_alive() or time.time() >= deadline:
                    break

    def free(self) -> list[str]:
        return [n for n in self._names if n not in self._busy]

    def busy(self) -> dict[str, int]:
        return {w: t for w, (t, _) in self._busy.items()}

    def submit(self, worker: str, trial: int, job: Job) -> None:
        if worker in self._busy:
            raise RuntimeError(f"worker {worker} is busy with trial {self._busy[worker][0]}")
        self._busy[worker] = (trial, time.time())
        self._inboxes[worker].put((trial, job))

    def wait(self, timeout: float | None = None) -> list[TrialResult]:
        """Block until at least one job finishes (or ``timeout``); return all that did."""
        out: list[TrialResult] = []
        deadline = None if timeout is None else time.time() + timeout
        while not out:
            step = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.time()))
            try:
                out.append(self._outbox.get(timeout=step))
            except queue.Empty:
                out.extend(self._reap_dead())
                if deadline is not None and time.time() >= deadline:
                    break
        while True:
            try:
                out.append(self._outbox.get_nowait())
            except queue.Empty:
                break
        for r in out:
            self._busy.pop(r.worker, None)
        return out

    def _reap_dead(self) -> list[TrialResult]:
        """A worker killed mid-job (OOM, signal) fails its trial and is replaced."""
        dead = []
        for w, (trial, t0) in list(self._busy.items()):
            proc = self._procs[w]
            if not proc.is_alive():
                dead.append(TrialResult(trial, w, False, {},
                                        f"worker {w} died (exit code {proc.exitcode})",
                                        t0, time.time()))
                self._spawn(w)
        return dead

    def close(self) -> None:
        for n in self._names:
            try:
                self._inboxes[n].put(None)
            except Exception:
                pass
        for n in self._names:
            proc = self._procs[n]
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Proposals computed beside the workers, so a freed worker never waits for a GP refit.

A refit plus acquisition takes seconds while a tiny-world evaluation takes less
than one, so the coordinator cannot afford to compute a proposal when a worker
frees up. :class:`Proposer` runs the algorithm in a background process on a
snapshot of the history; the coordinator keeps the newest batch as its ready
queue and hands points from it to workers as they free up. Each refit sees the
candidates in flight *and* the ready ones as pending points, so a new batch
does not repeat a point that was handed out while it was being computed.
"""
from __future__ import annotations

import multiprocessing as mp
import time
import warnings
from typing import Any, Sequence

import torch

from mergepipe.search.algorithms import Algorithm, History
from mergepipe.search.rerank import unseen


def canonical_history(dim: int, X: Sequence[Sequence[float]], Y: Sequence[Sequence[float]],
                      pending: Sequence[Sequence[float]] = ()) -> History:
    """The finished (X, Y) and the pending points as a :class:`History`, in one
    canonical order, whatever order the results arrived in.

    Results arrive in the order evaluations happen to finish, and a GP fit on
    the same points in another order ends in other last bits, which the
    acquisition's optimiser can carry across a step of the objectives (ties in
    a nearest pair break by order too): a synchronous search would then depend
    on which worker finished first, and a resumed search (which reads its
    history in trial order) would not propose what the uninterrupted one did.
    """
    rows = sorted(zip(X, Y), key=lambda r: ([float(v) for v in r[0]], [float(v) for v in r[1]]))
    return History(torch.tensor([r[0] for r in rows], dtype=torch.double).reshape(-1, dim),
                   torch.tensor([r[1] for r in rows], dtype=torch.double).reshape(-1, 2),
                   torch.tensor(sorted([float(v) for v in p] for p in pending),
                                dtype=torch.double).reshape(-1, dim))


def propose_points(alg: Algorithm, X: Sequence[Sequence[float]], Y: Sequence[Sequence[float]],
                   pending: Sequence[Sequence[float]], n: int, trial: int) -> list[list[float]]:
    """``n`` new points given finished (X, Y) and the pending points; never raises.

    The history is put in one canonical order first (:func:`canonical_history`).
    """
    hist = canonical_history(alg.dim, X, Y, pending)
    if hist.X.shape[0] < 2:  # nothing to model yet: continue the shared design
        return _continue_design(alg, hist, n, trial)
    try:
        return alg.propose(hist, n)[:n]
    except Exception as exc:  # a numerical failure must not end the search
        warnings.warn(f"proposal failed ({exc}); falling back to quasi-random points")
        return alg.fill([], hist, n)


def _continue_design(alg: Algorithm, hist: History, n: int, trial: int) -> list[list[float]]:
    """The shared design's points from ``trial`` on, never one of the fixed initial
    points (a batch asked for early is handed out after them) nor one in flight."""
    out = unseen(alg.design()[max(trial, alg.n_init):], hist.pending)[:n]
    return out if len(out) == n else alg.fill(out, hist, n)


class Proposer:
    """One background process that computes one batch of proposals at a time.

    A process, not a thread: a GP refit holds the GIL for much of its seconds,
    and a thread doing it would stall the coordinator's loop (dispatching and
    recording), so freed workers would wait after all. The algorithm is sent
    once; each request carries only the history snapshot.
    """

    def __init__(self, alg: Algorithm):
        ctx = mp.get_context("spawn")    # never fork a process that holds torch's threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(alg, child), name="mergepipe-proposer",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._busy = False
        self._done: tuple[int, list[list[float]]] | None = None
        self.last_s = 0.0       # how long the last batch took (the coordinator plans ahead with it)

    def _poll(self, block: bool = False) -> None:
        if self._busy and (block or self._conn.poll()):
            try:
                version, points, seconds = self._conn.recv()
            except EOFError:
                raise RuntimeError("the proposer process died") from None
            self._done, self.last_s, self._busy = (version, points), seconds, False

    @property
    def busy(self) -> bool:
        """A batch is being computed or waits to be taken."""
        self._poll()
        return self._busy or self._done is not None

    def request(self, X: list[list[float]], Y: list[list[float]], pending: list[list[float]],
                n: int, trial: int, version: int) -> None:
        """Start a batch on this snapshot; ``version`` comes back with the result."""
        if self.busy:
            raise RuntimeError("the proposer is already computing a batch")
        self._conn.send((X, Y, pending, n, trial, version))
        self._busy = True

    def take(self, block: bool = False) -> tuple[int, list[list[float]]] | None:
        """The finished batch as (version, points), or None if none is ready."""
        self._poll(block)
        done, self._done = self._done, None
        return done

    def close(self) -> None:
        """Stop the process (a batch in progress is abandoned)."""
        try:
            self._conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(timeout=2)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join()
        self._conn.close()


def _serve(alg: Algorithm, conn: Any) -> None:
    """The proposer process: one batch per request until told to stop."""
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        X, Y, pending, n, trial, version = job
        t0 = time.perf_counter()
        points = propose_points(alg, X, Y, pending, n, trial)
        conn.send((version, points, time.perf_counter() - t0))

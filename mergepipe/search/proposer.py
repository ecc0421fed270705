"""Proposals computed beside the workers, so a freed worker never waits for a GP refit.

A refit plus acquisition takes seconds while a tiny-world evaluation takes less
than one, so the coordinator cannot afford to compute a proposal when a worker
frees up. :class:`Proposer` runs the algorithm in a background thread on a
snapshot of the history; the coordinator keeps the newest batch as its ready
queue and hands points from it to workers as they free up. Each refit sees the
candidates in flight *and* the ready ones as pending points, so a new batch
does not repeat a point that was handed out while it was being computed.
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Sequence

import torch

from mergepipe.search.algorithms import Algorithm, History


def propose_points(alg: Algorithm, X: Sequence[Sequence[float]], Y: Sequence[Sequence[float]],
                   pending: Sequence[Sequence[float]], n: int, trial: int) -> list[list[float]]:
    """``n`` new points given finished (X, Y) and the pending points; never raises."""
    hist = History(torch.tensor(X, dtype=torch.double).reshape(-1, alg.dim),
                   torch.tensor(Y, dtype=torch.double).reshape(-1, 2),
                   torch.tensor(pending, dtype=torch.double).reshape(-1, alg.dim))
    if hist.X.shape[0] < 2:  # nothing to model yet: continue the shared design
        return [alg.design()[trial + i].tolist() for i in range(n)]
    try:
        return alg.propose(hist, n)[:n]
    except Exception as exc:  # a numerical failure must not end the search
        warnings.warn(f"proposal failed ({exc}); falling back to quasi-random points")
        return alg.fill([], hist, n)


class Proposer:
    """One background thread that computes one batch of proposals at a time."""

    def __init__(self, alg: Algorithm):
        self.alg = alg
        self._cv = threading.Condition()
        self._job: tuple | None = None
        self._done: tuple[int, list[list[float]]] | None = None
        self._busy = False
        self._closed = False
        self.last_s = 0.0       # how long the last batch took (the coordinator plans ahead with it)
        self._thread = threading.Thread(target=self._run, name="mergepipe-proposer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """A batch is being computed or waits to be taken."""
        with self._cv:
            return self._busy or self._done is not None

    def request(self, X: list[list[float]], Y: list[list[float]], pending: list[list[float]],
                n: int, trial: int, version: int) -> None:
        """Start a batch on this snapshot (copied); ``version`` comes back with the result."""
        with self._cv:
            if self._busy or self._done is not None:
                raise RuntimeError("the proposer is already computing a batch")
            self._job = ([list(x) for x in X], [list(y) for y in Y],
                         [list(p) for p in pending], n, trial, version)
            self._busy = True
            self._cv.notify_all()

    def take(self, block: bool = False) -> tuple[int, list[list[float]]] | None:
        """The finished batch as (version, points), or None if none is ready."""
        with self._cv:
            while block and self._done is None and self._busy:
                self._cv.wait()
            done, self._done = self._done, None
            return done

    def _run(self) -> None:
        torch.set_num_threads(1)
        while True:
            with self._cv:
                while self._job is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                X, Y, pending, n, trial, version = self._job
                self._job = None
            t0 = time.perf_counter()
            points = propose_points(self.alg, X, Y, pending, n, trial)
            with self._cv:
                self.last_s = time.perf_counter() - t0
                self._done = (version, points)
                self._busy = False
                self._cv.notify_all()

    def close(self) -> None:
        """Stop after the batch in progress (the thread is a daemon: exit never waits)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

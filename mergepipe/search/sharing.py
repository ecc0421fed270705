"""One evaluation shared between workers: a worker with nothing new to run helps a slow one.

When evaluation times vary (a large model, a candidate that talks long), the
workers that finish early would sit idle while the slowest trial ends: after the
budget is handed out, or while a synchronous batch waits for its last member.
So a trial's evaluation is cut into units that give the same answers wherever
they run: the transformers backend's generation batches (prompts sorted by
length, exactly as one `generate` call would batch them), or one unit per task
for an engine that schedules its own batches (vLLM). The trial's owner claims
units one at a time from a counter shared by the pool's processes; a free worker
sent to the same trial loads the same candidate and claims from the same
counter. The coordinator adds up the units' counts, so accuracy and mean tokens
are the ones a single worker would have computed, bit for bit.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol, Sequence

from mergepipe.errors import MergePipeError

SLOTS = 4096   # claim counters; a trial uses slot trial % SLOTS


class Board(Protocol):
    """The claim counters a pool's workers and its coordinator share.

    :class:`ClaimBoard` keeps them in shared memory for the processes of one
    machine; a Ray pool runs a :class:`ClaimBoard` in a small actor every
    evaluator can reach (:class:`mergepipe.search.ray_pool.RayBoard`).
    """

    def arm(self, slot: int) -> None: ...

    def count(self, slot: int, units: int) -> None: ...

    def claim(self, slot: int) -> int: ...

    def left(self, slot: int) -> int: ...

    def survey(self, slots: Sequence[int]) -> list[tuple[int, bool]]: ...


class ClaimBoard:
    """Per trial slot, units claimed so far and units in all (0 until a job has counted them).

    With a multiprocessing context it lives in shared memory created by the pool
    and handed to each worker process at start-up; the coordinator reads it to
    see which trial has work to share. Without one it is plain lists for a single
    process that serves every call in turn (a Ray pool's counters actor).
    """

    def __init__(self, ctx: Any = None) -> None:
        if ctx is None:
            self.claimed: Any = _Unlocked([0] * SLOTS)
            self.total: Any = [0] * SLOTS
        else:
            self.claimed = ctx.Array("i", SLOTS)
            self.total = ctx.Array("i", SLOTS, lock=False)

    def arm(self, slot: int) -> None:
        """Reset a slot before its trial is handed out."""
        with self.claimed.get_lock():
            self.claimed[slot] = 0
            self.total[slot] = 0

    def count(self, slot: int, units: int) -> None:
        """Say how many units the slot's evaluation has (each job counts the same)."""
        self.total[slot] = units

    def claim(self, slot: int) -> int:
        with self.claimed.get_lock():
            i = self.claimed[slot]
            self.claimed[slot] = i + 1
        return i

    def left(self, slot: int) -> int:
        """Units nobody has claimed yet (0 while nobody has counted them)."""
        with self.claimed.get_lock():
            return max(0, self.total[slot] - self.claimed[slot])

    def survey(self, slots: Sequence[int]) -> list[tuple[int, bool]]:
        """Per slot, (units left, whether a helper may yet find one): units are
        unclaimed, or not counted yet (the owner is still loading). One call for
        every trial in flight, so a remote board costs one round trip per look."""
        with self.claimed.get_lock():
            return [(max(0, self.total[s] - self.claimed[s]),
                     self.total[s] == 0 or self.total[s] > self.claimed[s]) for s in slots]


class _Unlocked(list):
    """A list with the ``get_lock`` of a shared array, for a board one process serves."""

    def get_lock(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()


BOARD: Board | None = None   # set in a pool's worker processes


def slot_of(trial: int) -> int:
    return trial % SLOTS


def units_of(engine: Any, tasks: Sequence[Any]) -> list[tuple[int, list[int]]]:
    """(task index, item indices) of every unit of loaded ``tasks``, the same list in
    every process."""
    units = []
    for k, task in enumerate(tasks):
        prompts = [it.prompt for it in task.items]
        groups = engine.batches(prompts) if hasattr(engine, "batches") \
            else [list(range(len(prompts)))]
        units += [(k, g) for g in groups]
    return units


def has_work(slot: int | None) -> bool:
    """Whether a helper sent to ``slot`` would find a unit left (always, outside a pool)."""
    return BOARD is None or slot is None or BOARD.left(slot) > 0


def score_units(engine: Any, tasks: Sequence[Any], slot: int | None,
                stretch: float = 1.0) -> dict[str, Any]:
    """Score the units this job claims (all of them without a shared counter).

    Returns ``{"units": {i: [task index, correct, tokens, n, wall_s]}, "n_units", "backend"}``.
    """
    from mergepipe.evaluate import Task, load_task, run_task
    from mergepipe.evaluate.runner import DEFAULT_MAX_NEW_TOKENS
    loaded = [load_task(t.path).head(t.limit) for t in tasks]   # each file read once
    units = units_of(engine, loaded)
    board = BOARD if slot is not None else None
    if board is not None:
        board.count(slot, len(units))
    done: dict[int, list[Any]] = {}
    i = -1
    while True:
        i = board.claim(slot) if board is not None else i + 1
        if i >= len(units):
            break
        k, idx = units[i]
        task = loaded[k]
        part = Task(task.name, task.path, tuple(task.items[j] for j in idx), task.split)
        t0 = time.time()
        res = run_task(engine, part, tasks[k].max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
        _stretch(time.time() - t0, stretch)
        done[i] = [k, sum(bool(o["correct"]) for o in res.outputs),
                   sum(int(o["tokens"]) for o in res.outputs), res.n, res.wall_s]
    return {"units": done, "n_units": len(units), "backend": engine.name}


def combine(parts: Sequence[dict[str, Any]], tasks: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Per task metrics from the units every share of one evaluation scored."""
    units: dict[int, list[Any]] = {}
    for p in parts:
        units.update(p["units"])
    n_units = max(p["n_units"] for p in parts)
    backend = next(p["backend"] for p in parts if p["n_units"])
    if sorted(units) != list(range(n_units)):
        raise MergePipeError(f"an evaluation came back with {len(units)} of its {n_units} units")
    metrics = {}
    for k, t in enumerate(tasks):
        rows = [u for u in units.values() if u[0] == k]
        n = sum(u[3] for u in rows)
        metrics[t.name] = {"accuracy": sum(u[1] for u in rows) / n,
                           "mean_tokens": sum(u[2] for u in rows) / n, "n": n,
                           "wall_s": sum(u[4] for u in rows), "backend": backend}
    return metrics


def nothing_left() -> dict[str, Any]:
    """What a helper returns when the units were all claimed before it started."""
    return {"units": {}, "n_units": 0, "backend": "", "report": None}


def _stretch(elapsed: float, factor: float) -> None:
    """Emulate a slower evaluation: wait (factor − 1) × the generation time just taken.

    Only generation is stretched: it is what varies between candidates of a
    large model (how long they talk), while merging and loading cost the same.
    """
    if factor > 1.0:
        time.sleep((factor - 1.0) * elapsed)

"""What a search has achieved so far, computed from its trial rows alone.

Utilisation is busy time over (workers × wall). A resumed search runs in
several coordinator sessions (worker names are ``s<session>.w<i>``), and the
time the search lay dead between sessions is not counted as wall time.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from mergepipe.catalog.store import Catalog
from mergepipe.search import trials
from mergepipe.search.objectives import REF_POINT, Anchors, hypervolume, pareto_mask


def session_of(worker: str | None) -> str:
    return worker.split(".", 1)[0] if worker and "." in worker else "s1"


def timing(rows: list[dict[str, Any]], workers: int) -> dict[str, float]:
    """Busy seconds (``helper_s`` of them spent helping another worker's trial), wall
    seconds (summed over sessions), utilisation, and the share of worker time idle
    after the last trial was handed out.

    That last share is the budget's drain: once every trial is out, a worker that
    finishes can only help the slowest evaluations end (take units of them), and
    is idle once none has a unit left. ``utilisation_while_work_left`` is the
    utilisation before it. A trial's busy time is its workers' seconds (owner and
    helpers, ``busy_s``), spread evenly over the trial's span for the split.
    """
    spans: dict[str, list[tuple[Any, Any, Any, float]]] = defaultdict(list)
    busy = helped = 0.0
    for r in rows:
        if r["status"] in trials.FINISHED and r["started_at"] and r["finished_at"]:
            span = (r["finished_at"] - r["started_at"]).total_seconds()
            worked = span if r.get("busy_s") is None else r["busy_s"]
            busy += worked
            helped += max(0.0, worked - span)
            # workers busy on the trial at a time: helpers' seconds spread over its span
            width = worked / span if span > 0 else 1.0
            spans[session_of(r["worker"])].append((r["submitted_at"] or r["started_at"],
                                                   r["started_at"], r["finished_at"], width))
    wall = before_wall = before_busy = 0.0
    for s in spans.values():
        start, end = min(a for a, _, _, _ in s), max(f for _, _, f, _ in s)
        last_out = max(a for a, _, _, _ in s)
        wall += (end - start).total_seconds()
        before_wall += (last_out - start).total_seconds()
        before_busy += sum(w * max(0.0, (min(f, last_out) - b).total_seconds())
                           for _, b, f, w in s)
    drain = workers * (wall - before_wall) - (busy - before_busy)
    return {"busy_s": busy, "wall_s": wall, "helper_s": helped,
            "utilisation": busy / (workers * wall) if wall > 0 else 0.0,
            "drain_idle": drain / (workers * wall) if wall > 0 else 0.0,
            "utilisation_while_work_left": (before_busy / (workers * before_wall)
                                            if before_wall > 0 else 0.0)}


def finished_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials in finishing order (failed ones sit at the reference point)."""
    done = [r for r in rows if r["status"] in trials.FINISHED and r["f_acc"] is not None]
    return sorted(done, key=lambda r: (r["finished_at"], r["trial"]))


def source_points(search: dict[str, Any]) -> list[tuple[float, float]]:
    """The two sources on the anchored map (none before the anchors are known)."""
    anchors = search.get("anchors")
    return Anchors.from_json(anchors["tasks"]).source_points() if anchors else []


def pareto_trials(rows: list[dict[str, Any]],
                  sources: Sequence[Sequence[float]] = ()) -> list[dict[str, Any]]:
    """DONE trials that neither another trial nor a source model dominates.

    A merge the base model beats on both objectives is no answer to the search,
    so the sources take part in the dominance test (but are not listed).
    """
    ok = [r for r in rows if r["status"] == "DONE"]
    if not ok:
        return []
    points = [list(p) for p in sources] + [[r["f_acc"], r["f_cost"]] for r in ok]
    mask = pareto_mask(points).tolist()[len(sources):]
    return sorted((r for r, m in zip(ok, mask) if m), key=lambda r: r["f_acc"])


def beaten_by_sources(rows: list[dict[str, Any]],
                      sources: Sequence[Sequence[float]]) -> int:
    """DONE trials a source matches or beats on both objectives.

    Such a merge can never be offered (the source is as good and costs no
    merge), so this counts the evaluations a search spent for nothing.
    """
    return sum(1 for r in rows if r["status"] == "DONE" and
               any(a >= r["f_acc"] and c >= r["f_cost"] for a, c in sources))


def summarise(cat: Catalog, search_id: str) -> dict[str, Any]:
    """The fields `search status --json` and `search run --json` print."""
    s = trials.get_search(cat, search_id)
    rows = trials.list_trials(cat, s["search_id"])
    pts = finished_points(rows)
    counts = defaultdict(int)
    for r in rows:
        counts[r["status"]] += 1
    t = timing(rows, int(s["config"].get("workers", 1)))
    sources = source_points(s)
    return {
        "search_id": s["search_id"], "algorithm": s["algorithm"], "status": s["status"],
        "trials": len(pts), "n_total": s["config"].get("n_total"),
        "done": counts["DONE"], "failed": counts["FAILED"],
        "in_flight": counts["RUNNING"] + counts["PENDING"],
        "hypervolume": hypervolume([[r["f_acc"], r["f_cost"]] for r in pts], REF_POINT),
        # the front a user gets: the sources cost no trial and are always on offer
        "hypervolume_with_sources": hypervolume(
            [list(p) for p in sources] + [[r["f_acc"], r["f_cost"]] for r in pts], REF_POINT),
        "pareto": len(pareto_trials(rows, sources)),
        "beaten_by_sources": beaten_by_sources(rows, sources),
        "utilisation": t["utilisation"], "wall_s": t["wall_s"], "busy_s": t["busy_s"],
        "drain_idle": t["drain_idle"], "helper_s": t["helper_s"],
        "utilisation_while_work_left": t["utilisation_while_work_left"],
        "workers": s["config"].get("workers"),
        "created_at": s["created_at"], "finished_at": s["finished_at"],
    }

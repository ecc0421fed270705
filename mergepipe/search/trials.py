"""Search and trial rows in the catalog: the search's only durable state.

Everything needed to resume lives here: the config, the anchors, the prior,
and one row per trial with its decision vector. Finished trials (DONE or
FAILED) are never rewritten; a trial caught in flight by a crash is put back
to PENDING and re-run with the same decision vector.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Sequence

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog, dumps, new_id, now
from mergepipe.errors import MergePipeError

FINISHED = ("DONE", "FAILED")
S, T = schema.searches, schema.trials


def epoch_to_dt(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).replace(tzinfo=None)


def create_search(cat: Catalog, algorithm: str, config: dict[str, Any]) -> str:
    sid = new_id()[:16]
    cat.execute(S.insert().values(search_id=sid, algorithm=algorithm, status="RUNNING",
                                  config_json=dumps(config), created_at=now()))
    return sid


def get_search(cat: Catalog, search_id: str) -> dict[str, Any]:
    """The search row for an id or an unambiguous id prefix."""
    rows = cat.rows(sa.select(S).where(S.c.search_id.like(f"{search_id}%")))
    if not rows:
        raise MergePipeError(f"no search {search_id!r} in the catalog "
                             f"(list them with `mergepipe search status`)")
    if len(rows) > 1:
        raise MergePipeError(f"search id prefix {search_id!r} is ambiguous ({len(rows)} match)")
    row = rows[0]
    row["config"] = json.loads(row["config_json"])
    row["prior"] = json.loads(row["prior_json"]) if row["prior_json"] else None
    row["anchors"] = json.loads(row["anchors_json"]) if row["anchors_json"] else None
    return row


def list_searches(cat: Catalog) -> list[dict[str, Any]]:
    return cat.rows(sa.select(S.c.search_id).order_by(S.c.created_at, S.c.search_id))


def update_search(cat: Catalog, search_id: str, **values: Any) -> None:
    if "prior" in values:
        values["prior_json"] = dumps(values.pop("prior"))
    if "anchors" in values:
        values["anchors_json"] = dumps(values.pop("anchors"))
    cat.execute(S.update().where(S.c.search_id == search_id).values(**values))


def list_trials(cat: Catalog, search_id: str) -> list[dict[str, Any]]:
    rows = cat.rows(sa.select(T).where(T.c.search_id == search_id).order_by(T.c.trial))
    for r in rows:
        r["x"] = json.loads(r["x_json"])
    return rows


def submit_trial(cat: Catalog, search_id: str, trial: int, x: Sequence[float], plan_id: str,
                 worker: str) -> None:
    """Insert (or re-arm after a crash) a trial that a worker has just been given."""
    values = dict(x_json=json.dumps([float(v) for v in x]), plan_id=plan_id, status="RUNNING",
                  worker=worker, submitted_at=now(), started_at=None, finished_at=None,
                  error=None, model_id=None)
    with cat.transaction() as c:
        existing = c.execute(sa.select(T.c.status).where(
            T.c.search_id == search_id, T.c.trial == trial)).first()
        if existing is None:
            c.execute(T.insert().values(search_id=search_id, trial=trial, **values))
        elif existing[0] in FINISHED:
            raise RuntimeError(f"trial {trial} of search {search_id} already finished")
        else:
            c.execute(T.update().where(T.c.search_id == search_id, T.c.trial == trial)
                      .values(**values))


def finish_trial(cat: Catalog, search_id: str, trial: int, *, ok: bool,
                 objectives: Sequence[float], started: float, finished: float,
                 busy_s: float | None = None, model_id: str | None = None, accuracy: float | None = None,
                 mean_tokens: float | None = None, error: str | None = None) -> None:
    cat.execute(T.update().where(T.c.search_id == search_id, T.c.trial == trial).values(
        status="DONE" if ok else "FAILED", f_acc=float(objectives[0]),
        f_cost=float(objectives[1]), model_id=model_id, accuracy=accuracy,
        mean_tokens=mean_tokens, error=error, started_at=epoch_to_dt(started),
        finished_at=epoch_to_dt(finished), busy_s=busy_s))


def interrupted_trials(cat: Catalog, search_id: str) -> list[dict[str, Any]]:
    """Trials a killed coordinator left in flight, re-armed as PENDING."""
    cat.execute(T.update().where(T.c.search_id == search_id, T.c.status.notin_(FINISHED))
                .values(status="PENDING", worker=None, started_at=None))
    return [t for t in list_trials(cat, search_id) if t["status"] == "PENDING"]


def _rows_keys(cat: Catalog) -> dict[str, str]:
    """Per search, a key of its search row and trial rows: statuses, counts, last finish.

    Plain SQL without bound parameters (DuckDB would import pandas to bind one), so
    `search status` can answer from stored summaries without torch or pandas."""
    keys: dict[str, list[str]] = {}
    for r in cat.rows(sa.text("SELECT search_id, status, finished_at FROM searches")):
        keys[r["search_id"]] = [f"{r['status']}:{r['finished_at']}"]
    for r in cat.rows(sa.text(
            "SELECT search_id, status, count(*) AS n, max(finished_at) AS last FROM trials "
            "GROUP BY search_id, status ORDER BY search_id, status")):
        keys.setdefault(r["search_id"], []).append(f"{r['status']}:{r['n']}:{r['last']}")
    return {sid: "|".join(k) for sid, k in keys.items()}


SUMMARY_VERSION = 2  # raise when a summary gains or changes a field: older ones are recomputed


def store_summary(cat: Catalog, search_id: str, summary: dict[str, Any]) -> None:
    """Keep a summary with the key of the rows it was computed from."""
    doc = {"rows_key": _rows_keys(cat).get(search_id), "version": SUMMARY_VERSION,
           "summary": summary}
    cat.execute(S.update().where(S.c.search_id == search_id).values(
        summary_json=json.dumps(doc, default=str)))


def stored_summaries(cat: Catalog, search_id: str | None = None
                     ) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The search ids (all, or the one ``search_id`` prefixes), and the stored summary of
    each whose rows have not changed since it was stored (by this version's fields)."""
    keys = _rows_keys(cat)
    rows = [(r["search_id"], r["summary_json"]) for r in cat.rows(sa.text(
        "SELECT search_id, summary_json FROM searches ORDER BY created_at, search_id"))]
    ids = [sid for sid, _ in rows if search_id is None or sid.startswith(search_id)]
    fresh = {}
    for sid, doc in rows:
        if sid in ids and doc:
            stored = json.loads(doc)
            if stored.get("rows_key") == keys.get(sid) and \
                    stored.get("version", 1) == SUMMARY_VERSION:
                fresh[sid] = stored["summary"]
    return ids, fresh

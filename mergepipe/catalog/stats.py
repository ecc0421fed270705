"""Block statistics rows: how much each expert differs from its base, block by block.

Budget planning ranks expert blocks by delta energy, so it needs, for every
(expert, tensor, block), the L2 norm and max-abs of ``expert − base`` plus the
base block's own norm. A block is a contiguous range of rows, hence one
contiguous byte range in the shard: exactly the unit the reader can skip.

A stats run is keyed by both models' fingerprints; re-registering a changed
model deletes its stats (see :mod:`mergepipe.catalog.register`). Computing
them is an analyze run (:mod:`mergepipe.runs.analyze`); this module only
stores and finds the rows.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog, now


def stats_state(cat: Catalog, expert: dict[str, Any], base: dict[str, Any]) -> dict[str, Any] | None:
    """The stats run for (expert, base) if it matches both models' current fingerprints."""
    t = schema.stats_runs
    rows = cat.rows(sa.select(t).where(t.c.expert_model_id == expert["model_id"],
                                       t.c.base_model_id == base["model_id"]))
    if not rows:
        return None
    r = rows[0]
    if r["expert_fingerprint"] != expert["fingerprint"] or r["base_fingerprint"] != base["fingerprint"]:
        return None
    return r


def missing_stats(cat: Catalog, experts: list[dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    """The experts whose stats against ``base`` are absent or stale."""
    return [e for e in experts if stats_state(cat, e, base) is None]


def load_block_stats(cat: Catalog, expert_ids: list[str],
                     base_id: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Block rows keyed by (expert_model_id, tensor), each list ordered by block."""
    t = schema.block_stats
    rows = cat.rows(sa.select(t).where(t.c.base_model_id == base_id,
                                       t.c.expert_model_id.in_(expert_ids))
                    .order_by(t.c.expert_model_id, t.c.tensor, t.c.block))
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["expert_model_id"], r["tensor"]), []).append(r)
    return out


def store_block_stats(cat: Catalog, pending: list[dict[str, Any]], base: dict[str, Any],
           rows: list[list[dict[str, Any]]], block_bytes: int, reads: list[int],
           walls: list[float]) -> None:
    """Replace each expert's stats atomically: old rows out, new rows and run in."""
    bs, sr = schema.block_stats, schema.stats_runs
    with cat.transaction() as c:
        for e, r, nread, wall in zip(pending, rows, reads, walls):
            for t in (bs, sr):
                c.execute(t.delete().where(t.c.expert_model_id == e["model_id"],
                                           t.c.base_model_id == base["model_id"]))
            if r:
                c.execute(bs.insert(), r)
            c.execute(sr.insert().values(
                expert_model_id=e["model_id"], base_model_id=base["model_id"],
                expert_fingerprint=e["fingerprint"], base_fingerprint=base["fingerprint"],
                block_bytes=block_bytes, bytes_read=nread, wall_s=wall, created_at=now()))

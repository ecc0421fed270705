"""Block statistics: how much each expert differs from its base, block by block.

Budget planning ranks expert blocks by delta energy, so it needs, for every
(expert, tensor, block), the L2 norm and max-abs of ``expert − base`` plus the
base block's own norm. A block is a contiguous range of rows, hence one
contiguous byte range in the shard: exactly the unit the reader can skip.

Computing them costs one full read of each expert (and of the base), so it is
done once per (expert, base) pair and reused by every later plan. A stats run is
keyed by both models' fingerprints; re-registering a changed model deletes its
stats (see :mod:`mergepipe.catalog.register`), and :func:`analyze` re-registers
the models it is given, so a changed file is noticed and its stats recomputed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import sqlalchemy as sa
import torch
from tqdm import tqdm

from mergepipe.catalog import schema
from mergepipe.catalog.register import register_model
from mergepipe.catalog.store import Catalog, now
from mergepipe.errors import MergePipeError
from mergepipe.planner.plan import Read, Source
from mergepipe.safetensors_format import FLOAT_CODES, torch_dtype

DEFAULT_BLOCK_BYTES = 1 << 20


@dataclass
class AnalyzeReport:
    """What one ``analyze`` call did; ``bytes_read`` counts base and expert reads."""

    base: str
    analyzed: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    blocks: int = 0
    bytes_read: int = 0
    wall_s: float = 0.0
    block_bytes: int = DEFAULT_BLOCK_BYTES


def block_ranges(shape: tuple[int, ...], nbytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) of about ``block_bytes`` each (at least one row per block)."""
    rows = shape[0] if shape else 1
    if rows == 0:
        return []
    row_bytes = max(1, nbytes // rows)
    step = max(1, block_bytes // row_bytes)
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


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


def _as_float(buf: bytearray, dtype: str) -> torch.Tensor:
    if not buf:
        return torch.zeros(0)
    return torch.frombuffer(buf, dtype=torch_dtype(dtype)).to(torch.float32)


def _read(src: int, t: dict[str, Any]) -> Read:
    return Read(src=src, file=t["file"], offset=t["byte_offset"], nbytes=t["byte_length"],
                dtype=t["dtype"])


def _tensor_pairs(cat: Catalog, expert: dict[str, Any],
                  base_tensors: dict[str, dict[str, Any]]) -> Iterator[tuple[dict, dict]]:
    """(base tensor, expert tensor) for every float tensor both have with one layout."""
    ext = {r["name"]: r for r in cat.model_tensors(expert["model_id"])}
    for name, bt in base_tensors.items():
        et = ext.get(name)
        if et is None or bt["dtype"] not in FLOAT_CODES:
            continue
        if et["shape"] != bt["shape"] or et["dtype"] != bt["dtype"]:
            raise MergePipeError(f"model {expert['name']!r} tensor {name!r} has shape/dtype "
                                 f"{et['shape']}/{et['dtype']} but the base has "
                                 f"{bt['shape']}/{bt['dtype']}")
        yield bt, et


def _refresh(cat: Catalog, model: dict[str, Any]) -> dict[str, Any]:
    """Re-register so a file changed since registration gets a new fingerprint (and no stats)."""
    return register_model(cat, model["path"], name=model["name"], kind=model["kind"])


def analyze(cat: Catalog, experts: list[dict[str, Any]], base: dict[str, Any],
            block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False, refresh: bool = True,
            force: bool = False, notify: Callable[[str], None] | None = None) -> AnalyzeReport:
    """Compute and store block statistics of each expert against ``base``.

    All pending experts share one sequential pass over the base, so K experts
    cost one base read plus K expert reads. Experts whose stats are current
    (same fingerprints, same block size) are skipped unless ``force``.
    """
    if block_bytes <= 0:
        raise MergePipeError(f"block size must be positive, got {block_bytes}")
    t0 = time.perf_counter()
    if refresh:
        base = _refresh(cat, base)
        experts = [_refresh(cat, e) for e in experts]
    report = AnalyzeReport(base=base["name"], block_bytes=block_bytes)
    pending = []
    seen: set[str] = set()
    for e in experts:
        if e["model_id"] == base["model_id"] or e["model_id"] in seen:
            continue
        seen.add(e["model_id"])
        state = stats_state(cat, e, base)
        if state is not None and state["block_bytes"] == block_bytes and not force:
            report.up_to_date.append(e["name"])
        else:
            pending.append(e)
    if not pending:
        report.wall_s = time.perf_counter() - t0
        return report
    if notify:
        notify(f"analyze: computing block statistics of {', '.join(e['name'] for e in pending)} "
               f"against {base['name']} (block size {block_bytes} bytes)")
    base_tensors = {r["name"]: r for r in cat.model_tensors(base["model_id"])}
    pairs = [{bt["name"]: et for bt, et in _tensor_pairs(cat, e, base_tensors)} for e in pending]
    # the engine's reader: same positional reads, same byte accounting
    from mergepipe.engine.reader import BlockReader
    reader = BlockReader([Source(m["name"], m["model_id"], m["path"], m["fingerprint"], role)
                          for m, role in [(base, "base")] + [(e, "expert") for e in pending]])
    rows: list[list[dict[str, Any]]] = [[] for _ in pending]
    walls = [0.0] * len(pending)
    total = sum(et["byte_length"] for p in pairs for et in p.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="analyze", disable=not progress)
    try:
        order = sorted(base_tensors.values(), key=lambda r: (r["file"], r["byte_offset"]))
        for bt in order:
            users = [k for k, p in enumerate(pairs) if bt["name"] in p]
            if not users:
                continue
            shape = tuple(json.loads(bt["shape"]))
            rows_n = shape[0] if shape else 1
            row_bytes = bt["byte_length"] // rows_n if rows_n else 0
            base_read = _read(0, bt)
            for block, (a, b) in enumerate(block_ranges(shape, bt["byte_length"], block_bytes)):
                n = (b - a) * row_bytes
                base_f = _as_float(reader.raw(base_read, a * row_bytes, n), bt["dtype"])
                base_l2 = float(torch.linalg.vector_norm(base_f, dtype=torch.float64))
                for k in users:
                    t1 = time.perf_counter()
                    et = pairs[k][bt["name"]]
                    x = _as_float(reader.raw(_read(k + 1, et), a * row_bytes, n), et["dtype"])
                    delta = x.sub_(base_f)
                    rows[k].append(dict(
                        expert_model_id=pending[k]["model_id"], base_model_id=base["model_id"],
                        tensor=bt["name"], block=block, row_start=a, row_end=b,
                        byte_offset=et["byte_offset"] + a * row_bytes, byte_length=n,
                        delta_l2=float(torch.linalg.vector_norm(delta, dtype=torch.float64)),
                        delta_maxabs=float(delta.abs().max()) if delta.numel() else 0.0,
                        base_l2=base_l2))
                    walls[k] += time.perf_counter() - t1
                    bar.update(n)
    finally:
        reader.close()
        bar.close()
    reads = reader.bytes_read[1:]
    report.bytes_read = sum(reader.bytes_read)
    _store(cat, pending, base, rows, block_bytes, reads, walls)
    report.analyzed = [e["name"] for e in pending]
    report.blocks = sum(len(r) for r in rows)
    report.wall_s = time.perf_counter() - t0
    return report


def _store(cat: Catalog, pending: list[dict[str, Any]], base: dict[str, Any],
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

"""Analyze runs: one pass over an expert and its base that stores per-block delta norms.

Computing them costs one full read of each expert (and of the base), so it is
done once per (expert, base) pair and reused by every later budgeted plan.
:func:`analyze` re-registers the models it is given, so a file changed since
registration is noticed and its stats recomputed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from mergepipe.catalog.register import register_model
from mergepipe.catalog.stats import stats_state, store_block_stats
from mergepipe.catalog.store import Catalog
from mergepipe.engine.reader import BlockReader
from mergepipe.errors import MergePipeError
from mergepipe.planner.plan import Source
from mergepipe.planner.tasks import tensor_read
from mergepipe.safetensors_format import FLOAT_CODES, row_split, torch_dtype

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
    rows, row_bytes = row_split(shape, nbytes)
    if rows == 0:
        return []
    step = max(1, block_bytes // max(1, row_bytes))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def _as_float(buf: bytearray, dtype: str) -> torch.Tensor:
    if not buf:
        return torch.zeros(0)
    return torch.frombuffer(buf, dtype=torch_dtype(dtype)).to(torch.float32)


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
            row_bytes = row_split(shape, bt["byte_length"])[1]
            base_read = tensor_read(0, bt, check_hash=False)
            for block, (a, b) in enumerate(block_ranges(shape, bt["byte_length"], block_bytes)):
                n = (b - a) * row_bytes
                base_f = _as_float(reader.raw(base_read, a * row_bytes, n), bt["dtype"])
                base_l2 = float(torch.linalg.vector_norm(base_f, dtype=torch.float64))
                for k in users:
                    t1 = time.perf_counter()
                    et = pairs[k][bt["name"]]
                    x = _as_float(reader.raw(tensor_read(k + 1, et, check_hash=False), a * row_bytes, n), et["dtype"])
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
    store_block_stats(cat, pending, base, rows, block_bytes, reads, walls)
    report.analyzed = [e["name"] for e in pending]
    report.blocks = sum(len(r) for r in rows)
    report.wall_s = time.perf_counter() - t0
    return report

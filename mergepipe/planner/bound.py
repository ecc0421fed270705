"""How far a budgeted merge can be from the exact one, from block statistics alone.

For methods linear in each expert's delta (linear, task arithmetic) the output
is ``base_coef·B + Σ_k c_k·δ_k`` with ``c_k = λ·w_k / D`` (``D`` the weight sum
when normalising, else 1). Dropping a block of δ_k changes that block of the
output by exactly ``c_k·δ_k,block``, so on any block the difference is at most
``Σ_k |c_k|·‖δ_k,omitted‖`` (triangle inequality), and blocks are disjoint row
ranges, so the tensor's Frobenius bound is the root sum of squares over blocks.

Both merges are computed in float32 and cast to the output dtype; on a block
where something was omitted those roundings may differ, so each such block
also carries a rounding allowance proportional to its magnitude. Blocks where
nothing with a nonzero delta was omitted are computed from identical inputs
and agree exactly. For sparsifying / consensus methods the same number is
reported but labelled an estimate: pruning thresholds and sign votes depend on
the whole tensor, so the difference is not linear in the omitted deltas.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from mergepipe.planner.plan import Plan, Read, TensorTask

F32_UNIT = 2.0 ** -24
# one rounding of each output (exact and budgeted) to the output dtype: ≤ half an ulp each
CAST_UNIT = {"F32": 0.0, "F64": 0.0, "BF16": 2.0 ** -8, "F16": 2.0 ** -11}

Block = dict[str, Any]   # a block_stats row


@dataclass
class InputShare:
    """One expert input of one task under a plan: bytes and weighted delta energy."""

    task: int
    src: int
    layer: int | None
    coef: float
    read: int
    skipped: int
    energy: float          # Σ (c·l2)² over all blocks
    energy_kept: float     # the part in blocks the plan reads
    omitted_norm: float    # c·‖δ omitted‖


def coefficients(task: TensorTask) -> tuple[list[float], float]:
    """|c_k| for each input and the coefficient of the base in the output.

    Weights of inputs the budget took out of the computation (``unread_weights``)
    count towards the base coefficient; see :func:`unread_inputs` for their c_k.
    """
    m = len(task.inputs)
    weights = [float(w) for w in task.params.get("weight", [1.0] * m)]
    unread = [float(w) for w in task.params.get("unread_weights", {}).values()]
    lam = float(task.params.get("lambda", 1.0))
    divisor = sum(weights + unread) if task.params.get("normalize") else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    coefs = [abs(lam * w / divisor) for w in weights]
    base_coef = max(1.0, sum(abs(w) for w in weights + unread) / abs(divisor))
    return coefs, base_coef


def unread_inputs(task: TensorTask) -> list[tuple[str, float]]:
    """(source key, |c_k|) of inputs dropped from the computation: all of them omitted."""
    lam = float(task.params.get("lambda", 1.0))
    return [(key, abs(lam * float(w))) for key, w in task.params.get("unread_weights", {}).items()]


def is_selected(read: Read, a: int, b: int) -> bool:
    """Whether rows [a, b) of this input are read under the plan."""
    if read.alias_base:
        return False
    if read.rows is None:
        return True
    starts = [r[0] for r in read.rows]
    i = bisect.bisect_right(starts, a) - 1
    return i >= 0 and read.rows[i][0] <= a and b <= read.rows[i][1]


def _groups(blocks: list[list[Block]]) -> list[list[list[Block]]]:
    """Blocks grouped by disjoint row ranges shared by every input.

    When all inputs were analysed with the same block layout, each block is a
    group; otherwise the whole tensor is one group (still a valid, looser bound).
    """
    layouts = {tuple((b["row_start"], b["row_end"]) for b in bl) for bl in blocks}
    if len(layouts) == 1:
        n = len(blocks[0])
        return [[[bl[i]] for bl in blocks] for i in range(n)]
    return [[bl for bl in blocks]]


Entry = tuple[float, "Read | None", list[Block]]   # (|c_k|, its Read or None if unread, blocks)


def task_bound(task: TensorTask, entries: list[Entry]) -> float:
    """Frobenius bound on ‖exact − budgeted‖ for one output tensor.

    ``entries`` hold every expert input that may differ from the base: its
    coefficient, its Read (None when no block of it is read) and its stats blocks.
    """
    _, base_coef = coefficients(task)
    live = [e for e in entries if e[2]]
    if not live:
        return 0.0
    unit = (len(entries) + 4) * F32_UNIT + CAST_UNIT.get(task.out_dtype, 2.0 ** -8)
    total = 0.0
    for group in _groups([bl for _, _, bl in live]):
        omitted = full = 0.0
        base_sq = sum(b["base_l2"] ** 2 for b in group[0])
        for (coef, r, _), gblocks in zip(live, group):
            miss = sum(b["delta_l2"] ** 2 for b in gblocks
                       if r is None or not is_selected(r, b["row_start"], b["row_end"]))
            omitted += coef * math.sqrt(miss)
            full += coef * math.sqrt(sum(b["delta_l2"] ** 2 for b in gblocks))
        if omitted > 0:
            omitted += unit * (base_coef * math.sqrt(base_sq) + full)
        total += omitted ** 2
    return math.sqrt(total)


def input_shares(plan: Plan, stats: dict[tuple[str, str], list[Block]]) -> tuple[list[InputShare], list[float]]:
    """Per (task, expert input) shares, and each task's bound (0 for untouched tasks)."""
    b = plan.base_source()
    by_key = {s.key: i for i, s in enumerate(plan.sources)}
    shares: list[InputShare] = []
    bounds: list[float] = []
    for ti, t in enumerate(plan.tasks):
        if b is None or t.scope == "copy":
            bounds.append(0.0)
            continue
        coefs, _ = coefficients(t) if t.inputs else ([], 1.0)
        entries: list[tuple[int, float, Read | None]] = [
            (r.src, coefs[i], r) for i, r in enumerate(t.inputs) if not r.alias_base and r.src != b]
        entries += [(by_key[key], c, None) for key, c in unread_inputs(t)]
        bound_entries: list[Entry] = []
        for src, coef, r in entries:
            bl = stats.get((plan.sources[src].model_id, t.name), [])
            bound_entries.append((coef, r, bl))
            nbytes = r.nbytes if r is not None else (t.base.nbytes if t.base else 0)
            read = r.bytes_to_read(t.row_bytes(r)) if r is not None else 0
            kept = miss = 0.0
            for x in bl:
                e = (coef * x["delta_l2"]) ** 2
                if r is not None and is_selected(r, x["row_start"], x["row_end"]):
                    kept += e
                else:
                    miss += e
            shares.append(InputShare(ti, src, t.layer, coef, read, nbytes - read,
                                     kept + miss, kept, math.sqrt(miss)))
        bounds.append(task_bound(t, bound_entries))
    return shares, bounds

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
    """|c_k| for each input and the coefficient of the base in the output."""
    m = len(task.inputs)
    weights = [float(w) for w in task.params.get("weight", [1.0] * m)]
    lam = float(task.params.get("lambda", 1.0))
    divisor = sum(weights) if task.params.get("normalize") else 1.0
    if abs(divisor) < 1e-8:
        divisor = 1.0
    coefs = [abs(lam * w / divisor) for w in weights]
    base_coef = max(1.0, sum(abs(w) for w in weights) / abs(divisor))
    return coefs, base_coef


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


def task_bound(task: TensorTask, blocks: list[list[Block] | None]) -> float:
    """Frobenius bound on ‖exact − budgeted‖ for one output tensor.

    ``blocks[i]`` are the stats blocks of input i (None for inputs that alias
    the base and so never differ from it).
    """
    coefs, base_coef = coefficients(task)
    live = [(i, bl) for i, bl in enumerate(blocks) if bl is not None and bl]
    if not live:
        return 0.0
    unit = (len(task.inputs) + 4) * F32_UNIT + CAST_UNIT.get(task.out_dtype, 2.0 ** -8)
    total = 0.0
    for group in _groups([bl for _, bl in live]):
        omitted = full = 0.0
        base_sq = sum(b["base_l2"] ** 2 for b in group[0])
        for (i, _), gblocks in zip(live, group):
            r = task.inputs[i]
            miss = sum(b["delta_l2"] ** 2 for b in gblocks
                       if not is_selected(r, b["row_start"], b["row_end"]))
            omitted += coefs[i] * math.sqrt(miss)
            full += coefs[i] * math.sqrt(sum(b["delta_l2"] ** 2 for b in gblocks))
        if omitted > 0:
            omitted += unit * (base_coef * math.sqrt(base_sq) + full)
        total += omitted ** 2
    return math.sqrt(total)


def input_shares(plan: Plan, stats: dict[tuple[str, str], list[Block]]) -> tuple[list[InputShare], list[float]]:
    """Per (task, expert input) shares, and each task's bound (0 for untouched tasks)."""
    b = plan.base_source()
    shares: list[InputShare] = []
    bounds: list[float] = []
    for ti, t in enumerate(plan.tasks):
        per_input: list[list[Block] | None] = []
        coefs, _ = coefficients(t) if t.inputs else ([], 1.0)
        for i, r in enumerate(t.inputs):
            if r.alias_base or r.src == b or t.scope == "copy":
                per_input.append(None)
                continue
            bl = stats.get((plan.sources[r.src].model_id, t.name), [])
            per_input.append(bl)
            row_bytes = r.nbytes // t.rows if t.rows else 0
            read = r.bytes_to_read(row_bytes)
            kept = miss = 0.0
            for x in bl:
                e = (coefs[i] * x["delta_l2"]) ** 2
                if is_selected(r, x["row_start"], x["row_end"]):
                    kept += e
                else:
                    miss += e
            shares.append(InputShare(ti, r.src, t.layer, coefs[i], read, r.nbytes - read,
                                     kept + miss, kept, math.sqrt(miss)))
        bounds.append(task_bound(t, per_input) if b is not None and t.scope != "copy" else 0.0)
    return shares, bounds

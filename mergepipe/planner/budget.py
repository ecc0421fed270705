"""Budget mode: read only the expert blocks that matter, under a hard byte cap.

Base reads and output writes are unavoidable; expert reads are not, and they
grow with the number of experts. Starting from the exact plan, every (expert,
tensor, block) unit is scored by its weighted delta energy per byte,
``(c_k·‖δ‖)² / bytes``, and units are taken greedily while they fit. An
unselected block counts as zero delta: the engine fills it from the base
without touching the expert file. Blocks are the ones ``analyze`` measured, so
the bytes the plan promises are exactly the bytes the reader will pull.

Blocks whose delta is exactly zero are never read below 100%: they cannot
change the output. At or above 100% the plan keeps the exact read schedule, so
its output is byte-identical to the exact merge.
"""
from __future__ import annotations

import math
from collections import defaultdict
from fractions import Fraction
from typing import Any

from mergepipe.catalog.register import check_fresh
from mergepipe.catalog.stats import load_block_stats, missing_stats
from mergepipe.catalog.store import Catalog
from mergepipe.errors import BudgetError, MergePipeError
from mergepipe.methods.base import MergeMethod, drops_base_equal_inputs, get_method
from mergepipe.planner.bound import coefficients, input_shares
from mergepipe.planner.plan import Plan, Source
from mergepipe.planner.resolve import resolve_model
from mergepipe.planner.spec import parse_size, parse_spec
from mergepipe.planner.tasks import tensor_read


BUDGET_FORMS = "10% (of the full expert reads), 2GiB, 500MB or 1500000000B"


def resolve_budget(value: str | int | float, full: int) -> int:
    """Bytes from '2GiB', '1500000000B', '10%' (of the full expert reads) or an int
    (library calls); refuses < 0, and a string without a unit: on a command line
    `--io-budget 10` is too easily meant as 10% to be taken as 10 bytes."""
    if isinstance(value, bool):
        raise BudgetError(f"cannot read I/O budget {value!r}")
    text = str(value).strip()
    if isinstance(value, str) and text.lstrip("+-").replace(".", "", 1).replace("_", "").isdigit():
        raise BudgetError(f"I/O budget {value!r} has no unit; write it as {BUDGET_FORMS}")
    if text.endswith("%"):
        try:
            pct = Fraction(text[:-1].strip())
        except (ValueError, ZeroDivisionError):
            raise BudgetError(f"cannot read I/O budget {value!r}; write it as {BUDGET_FORMS}")
        n = math.floor(full * pct / 100)
    else:
        try:
            n = parse_size(value, "I/O budget")
        except MergePipeError as exc:
            msg = str(exc)
            raise BudgetError(msg if not msg.startswith("cannot read") else
                              f"cannot read I/O budget {value!r}; write it as {BUDGET_FORMS}")
    if n < 0:
        raise BudgetError(f"I/O budget {value!r} is below zero; no plan can read less than "
                          f"nothing (use 0 to read no expert bytes at all)")
    return n


def attach_base(cat: Catalog, plan: Plan) -> dict[str, Any]:
    """The plan's base model, adding the spec's base_model for methods that ignore it.

    Unread blocks are filled from the base, so budget mode needs one even for
    linear merges; an expert that *is* the base then aliases it and costs nothing.
    """
    b = plan.base_source()
    if b is not None:
        return cat.require_model(plan.sources[b].model_id)
    ref = parse_spec(plan.spec).base
    if not ref:
        raise BudgetError(f"an I/O budget needs a base model (unread expert blocks are taken "
                          f"from it); add base_model to the {plan.method} spec")
    base = resolve_model(cat, str(ref))
    check_fresh(cat, base)
    plan.sources.append(Source(base["name"], base["model_id"], base["path"],
                               base["fingerprint"], "base"))
    bi = len(plan.sources) - 1
    tensors = {r["name"]: r for r in cat.model_tensors(base["model_id"])}
    for t in plan.tasks:
        bt = tensors.get(t.name)
        if bt is None or bt["dtype"] != (t.inputs[0].dtype if t.inputs else bt["dtype"]):
            raise BudgetError(f"base model {base['name']!r} has no tensor {t.name!r} matching "
                              f"the experts' dtype")
        t.base = tensor_read(bi, bt)
        if t.scope == "copy":
            t.inputs, t.input_keys = [], []
        for r in t.inputs:
            if plan.sources[r.src].model_id == base["model_id"]:
                r.alias_base = True
    return base


def _expert_models(cat: Catalog, plan: Plan) -> list[dict[str, Any]]:
    b = plan.base_source()
    ids: list[str] = []
    for t in plan.tasks:
        for r in t.inputs:
            mid = plan.sources[r.src].model_id
            if r.src != b and not r.alias_base and mid not in ids:
                ids.append(mid)
    return [cat.require_model(mid) for mid in ids]


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _units(plan: Plan, stats: dict[tuple[str, str], list[dict[str, Any]]]) -> list[tuple]:
    """(score, bytes, task, input, row_start, row_end) for every expert block."""
    b = plan.base_source()
    units = []
    for ti, t in enumerate(plan.tasks):
        if t.scope == "copy" or not t.inputs:
            continue
        coefs, _ = coefficients(t)
        for i, r in enumerate(t.inputs):
            if r.alias_base or r.src == b:
                continue
            src = plan.sources[r.src]
            blocks = stats.get((src.model_id, t.name))
            if not blocks or blocks[-1]["row_end"] != t.rows:
                raise BudgetError(f"block statistics of {src.key!r} do not cover tensor "
                                  f"{t.name!r}; run `mergepipe analyze {src.key} --base "
                                  f"{plan.sources[b].key}` again")
            row_bytes = t.row_bytes(r)
            for x in blocks:
                n = (x["row_end"] - x["row_start"]) * row_bytes
                score = (coefs[i] * x["delta_l2"]) ** 2 / n if n else 0.0
                units.append((score, n, ti, i, x["row_start"], x["row_end"]))
    return units


def _select(plan: Plan, units: list[tuple], budget: int) -> None:
    """Greedy fill by energy per byte; writes each expert Read's row ranges."""
    chosen: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    left = budget
    for score, n, ti, i, a, b in sorted(units, key=lambda u: (-u[0], u[2], u[3], u[4])):
        if score <= 0:
            break
        if n <= left:
            chosen[(ti, i)].append((a, b))
            left -= n
    for _, _, ti, i, _, _ in units:
        t = plan.tasks[ti]
        rows = _coalesce(chosen.get((ti, i), []))
        t.inputs[i].rows = None if rows == [(0, t.rows)] else rows


def _drop_unread(plan: Plan, method: MergeMethod) -> None:
    """Take inputs with no block selected out of the computation where that is exact.

    Such an input equals the base, so its delta is zero. When the method adds
    weighted deltas to a base without dividing by the summed weights, a zero
    delta contributes exactly nothing (also to sign votes and masks), so the
    engine need not reconstruct and merge it. Its weight is kept under
    ``unread_weights`` so the bound and ``explain`` still account for it.
    """
    for t in plan.tasks:
        if t.scope == "copy" or not drops_base_equal_inputs(method, t.params):
            continue
        keep = [i for i, r in enumerate(t.inputs) if r.rows != []]
        if len(keep) == len(t.inputs):
            continue
        unread = {t.input_keys[i]: t.params["weight"][i]
                  for i in range(len(t.inputs)) if i not in keep}
        for key in method.model_params:
            t.params[key] = [t.params[key][i] for i in keep]
        t.params["unread_weights"] = unread
        t.inputs = [t.inputs[i] for i in keep]
        t.input_keys = [t.input_keys[i] for i in keep]
        t.skipped = t.skipped + list(unread)


def budget_models(cat: Catalog, plan: Plan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base (attached to the plan if the method ignores it) and the experts whose
    block statistics a budget over this plan needs."""
    return attach_base(cat, plan), _expert_models(cat, plan)


def apply_budget(cat: Catalog, plan: Plan, io_budget: str | int) -> Plan:
    """Turn an exact plan into one that reads at most ``io_budget`` expert bytes.

    The experts' block statistics against the base must be in the catalog
    (an analyze run stores them)."""
    method = get_method(plan.method)
    base, experts = budget_models(cat, plan)
    full = plan.full_expert_bytes()
    budget = resolve_budget(io_budget, full)
    missing = missing_stats(cat, experts, base)
    if missing:
        names = " ".join(e["name"] for e in missing)
        raise BudgetError(f"no block statistics for {names} against {base['name']}; run "
                          f"`mergepipe analyze {names} --base {base['name']}` first "
                          f"(or plan without --no-analyze)")
    stats = load_block_stats(cat, [e["model_id"] for e in experts], base["model_id"])
    units = _units(plan, stats)
    if budget < full:
        _select(plan, units, budget)
        _drop_unread(plan, method)
    est = plan.est_bytes()["experts"]
    if est > budget:  # cannot happen with a base; kept as the guarantee's last line
        raise BudgetError(f"I/O budget {budget} bytes is below the {est} expert bytes this "
                          f"merge must read")
    _, bounds = input_shares(plan, stats)
    plan.io_budget = budget
    plan.error_bound = math.sqrt(sum(x * x for x in bounds))
    plan.error_bound_kind = method.bound_kind
    return plan.finalize()

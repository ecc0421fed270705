"""Turn a merge spec into an exact Plan: every needed byte read once, in file order.

Budgeted plans start from the exact plan and drop expert blocks
(see :mod:`mergepipe.planner.budget`); specs with ``slices`` are planned by
:mod:`mergepipe.planner.slices`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mergepipe.catalog.register import check_fresh
from mergepipe.catalog.store import Catalog
from mergepipe.planner.params import gradient_t
from mergepipe.planner.plan import Plan, TensorTask
from mergepipe.planner.resolve import resolve_model
from mergepipe.planner.slices import build_slice_plan
from mergepipe.planner.spec import parse_spec
from mergepipe.planner.tasks import (InputRef, assign_shards, check_settings, input_tensor,
                                     make_sources, make_task, out_dtype_code, side_files,
                                     split_base, tensor_map)


def build_exact_plan(cat: Catalog, spec_src: str | Path | dict[str, Any],
                     seed: int | None = None) -> Plan:
    spec = parse_spec(spec_src, seed)
    method = spec.method
    if spec.slices is not None:
        return build_slice_plan(cat, spec)
    declared = resolve_model(cat, spec.base) if spec.base else None
    entries = [(resolve_model(cat, m.ref), m.params) for m in spec.models]
    base, entries = split_base(method, declared, entries, "models")
    for row in ([base] if base else []) + [row for row, _ in entries]:
        check_fresh(cat, row)
    # config and tokenizer come from the base_model even when it is an ordinary input
    layout_model = declared or entries[0][0]
    num_layers = layout_model["num_layers"]
    check_settings([p for _, p in entries] + [spec.parameters], num_layers)

    sources = make_sources(base, ([declared] if declared and not base else []) +
                           [row for row, _ in entries])
    src_of = {s.model_id: i for i, s in enumerate(sources)}
    layout = tensor_map(cat, layout_model["model_id"])
    input_tensors = [tensor_map(cat, row["model_id"]) for row, _ in entries]
    out_code = out_dtype_code(spec)

    tasks: list[TensorTask] = []
    for name, t in sorted(layout.items(), key=lambda kv: (kv[1]["file"], kv[1]["byte_offset"])):
        inputs = [InputRef(src_of[row["model_id"]], row["name"],
                           input_tensor(input_tensors[k], name, row["name"], t,
                                        layout_model["name"]),
                           [params, spec.parameters])
                  for k, (row, params) in enumerate(entries)]
        layer = t["layer"]
        pos = 0.0 if layer is None else gradient_t(layer, num_layers)
        tasks.append(make_task(method, name, layer, pos, t,
                               (0, t) if base else None, inputs, [spec.parameters], out_code))

    shards = assign_shards(tasks, spec.out_shard_size)
    plan = Plan(method=method.name, seed=spec.seed, sources=sources, tasks=tasks, shards=shards,
                copy_files=side_files(cat, layout_model["model_id"]), spec=spec.raw)
    return plan.finalize()

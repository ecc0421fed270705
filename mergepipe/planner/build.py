"""Turn a merge spec into an exact Plan: every needed byte read once, in file order.

Budgeted plans start from the exact plan and drop expert blocks
(see :mod:`mergepipe.planner.budget`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.register import check_fresh, register_model
from mergepipe.catalog.store import Catalog, now
from mergepipe.errors import MergePipeError, SpecError
from mergepipe.methods.base import REQUIRED, MergeMethod
from mergepipe.planner.params import MISSING, first_resolved
from mergepipe.planner.plan import Plan, Read, Source, TensorTask
from mergepipe.planner.spec import MergeSpec, parse_spec
from mergepipe.safetensors_format import FLOAT_CODES, dtype_code, itemsize, official_order

COPY_ROLES = ("config", "generation", "tokenizer")


def resolve_model(cat: Catalog, ref: str) -> dict[str, Any]:
    """A catalog name, or a directory registered on the fly."""
    m = cat.model_by_name(ref)
    if m is not None:
        return m
    p = Path(ref).expanduser()
    if p.is_dir():
        known = cat.model_by_path(p)
        if known is not None:
            return known
        row = register_model(cat, p)
        cat.fresh_models.append(row["model_id"])
        return row
    raise SpecError(f"model {ref!r} is neither a catalog name nor a model directory")


def _tensor_map(cat: Catalog, model_id: str) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in cat.model_tensors(model_id)}


def _numeric(key: str, value: Any, where: str) -> Any:
    if isinstance(value, bool) or key in ("normalize", "rescale", "int8_mask", "filter_wise"):
        return bool(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SpecError(f"parameter {key!r} for {where}: expected a number, got {value!r}")


def resolve_params(spec: MergeSpec, method: MergeMethod, input_params: list[dict[str, Any]],
                   input_names: list[str], tensor: str, layer: int | None,
                   num_layers: int | None) -> dict[str, Any]:
    """Every parameter of the method for one tensor: per-model lists and globals."""
    out: dict[str, Any] = {}
    for key, default in method.model_params.items():
        values = []
        for params, name in zip(input_params, input_names):
            v = first_resolved([params, spec.parameters], key, tensor, layer, num_layers)
            if v is MISSING:
                if default is REQUIRED:
                    raise SpecError(f"parameter {key!r} is missing for model {name!r}")
                v = default
            values.append(_numeric(key, v, name))
        out[key] = values
    for key, default in method.global_params.items():
        v = first_resolved([spec.parameters], key, tensor, layer, num_layers)
        out[key] = _numeric(key, default if v is MISSING else v, "the merge")
    return out


def build_exact_plan(cat: Catalog, spec_src: str | Path | dict[str, Any],
                     seed: int | None = None) -> Plan:
    spec = parse_spec(spec_src, seed)
    method = spec.method
    if spec.slices is not None:
        from mergepipe.planner.slices import build_slice_plan  # frankenmerges
        return build_slice_plan(cat, spec)
    base = resolve_model(cat, spec.base) if spec.base else None
    inputs = [(m, resolve_model(cat, m.ref)) for m in spec.models]
    if method.base == "required":
        # a base listed among the models is the base, not an expert (as in mergekit)
        inputs = [(m, row) for m, row in inputs if base is None or row["model_id"] != base["model_id"]]
    elif method.base == "none":
        base = None
    for _, row in ([(None, base)] if base else []) + inputs:
        check_fresh(cat, row)
    layout_model = base or inputs[0][1]
    num_layers = layout_model["num_layers"]
    for m, _ in inputs:
        for key, value in list(m.params.items()) + list(spec.parameters.items()):
            if isinstance(value, dict):
                from mergepipe.planner.params import validate_setting
                validate_setting(key, value, num_layers)

    sources: list[Source] = []
    if base:
        sources.append(Source(base["name"], base["model_id"], base["path"], base["fingerprint"], "base"))
    for _, row in inputs:
        sources.append(Source(row["name"], row["model_id"], row["path"], row["fingerprint"], "expert"))
    input_srcs = list(range(1 if base else 0, len(sources)))
    base_tensors = _tensor_map(cat, base["model_id"]) if base else None
    layout = base_tensors if base_tensors is not None else _tensor_map(cat, layout_model["model_id"])
    input_tensors = [_tensor_map(cat, row["model_id"]) for _, row in inputs]
    input_names = [row["name"] for _, row in inputs]
    spec_out = spec.out_dtype or spec.dtype
    out_code = dtype_code(spec_out) if spec_out else None

    tasks: list[TensorTask] = []
    for name, t in sorted(layout.items(), key=lambda kv: (kv[1]["file"], kv[1]["byte_offset"])):
        shape = tuple(json.loads(t["shape"]))
        base_read = _read(0, t) if base else None
        reads, keys, kept_params, skipped = [], [], [], []
        for k, (m, _) in enumerate(inputs):
            et = input_tensors[k].get(name)
            if et is None:
                raise MergePipeError(f"model {input_names[k]!r} has no tensor {name!r} "
                                     f"that {layout_model['name']!r} has")
            if tuple(json.loads(et["shape"])) != shape:
                raise MergePipeError(f"shape mismatch for {name!r}: {list(shape)} in "
                                     f"{layout_model['name']!r} but {json.loads(et['shape'])} "
                                     f"in {input_names[k]!r}")
            if et["dtype"] != t["dtype"]:
                raise MergePipeError(f"dtype mismatch for {name!r}: {t['dtype']} in "
                                     f"{layout_model['name']!r} but {et['dtype']} in "
                                     f"{input_names[k]!r}")
        all_params = resolve_params(spec, method, [m.params for m, _ in inputs], input_names,
                                    name, t["layer"], num_layers)
        for k, (m, _) in enumerate(inputs):
            et = input_tensors[k][name]
            if method.zero_weight_skips and "weight" in all_params and all_params["weight"][k] == 0:
                skipped.append(input_names[k])
                continue
            r = _read(input_srcs[k], et)
            if base_tensors is not None and et["content_hash"] and \
                    et["content_hash"] == t["content_hash"]:
                r.alias_base = True
            reads.append(r)
            keys.append(input_names[k])
            kept_params.append(k)
        params = {key: ([v[k] for k in kept_params] if key in method.model_params else v)
                  for key, v in all_params.items()}
        is_float = t["dtype"] in FLOAT_CODES
        if method.base == "none" and not reads and is_float:
            raise SpecError(f"every model has weight 0 for tensor {name!r}")
        tasks.append(TensorTask(
            name=name, shape=shape, out_dtype=(out_code if is_float and out_code else t["dtype"]),
            layer=t["layer"], scope=method.scope_for(params) if is_float else "copy",
            params=params, base=base_read, inputs=reads if is_float or not base else [],
            input_keys=keys if is_float or not base else [], skipped=skipped))
        if not is_float and not base:
            tasks[-1].inputs, tasks[-1].input_keys = reads[:1], keys[:1]

    shards = assign_shards(tasks, spec.out_shard_size)
    side = cat.rows(sa.select(schema.files.c.relpath).where(
        schema.files.c.model_id == layout_model["model_id"],
        schema.files.c.role.in_(COPY_ROLES)))
    plan = Plan(method=method.name, seed=spec.seed, sources=sources, tasks=tasks, shards=shards,
                copy_files=sorted(r["relpath"] for r in side), spec=spec.raw)
    return plan.finalize()


def _read(src: int, t: dict[str, Any]) -> Read:
    return Read(src=src, file=t["file"], offset=t["byte_offset"], nbytes=t["byte_length"],
                dtype=t["dtype"])


def assign_shards(tasks: list[TensorTask], shard_size: int) -> list[str]:
    """Fill output shards in read order, then order each shard as the official writer does."""
    shard, used = 0, 0
    for t in tasks:
        size = t.numel * itemsize(t.out_dtype)
        if used and used + size > shard_size:
            shard, used = shard + 1, 0
        t.shard = shard
        used += size
    n = shard + 1
    by_name = {t.name: t for t in tasks}
    ordered: list[TensorTask] = []
    for s in range(n):
        members = [(t.name, t.out_dtype) for t in tasks if t.shard == s]
        ordered += [by_name[name] for name, _ in official_order(members)]
    tasks[:] = ordered
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def store_plan(cat: Catalog, plan: Plan) -> bool:
    """Insert the plan if new; returns True when it was inserted."""
    t = schema.plans
    if cat.rows(sa.select(t.c.plan_id).where(t.c.plan_id == plan.plan_id)):
        return False
    est = plan.est_bytes()
    base = plan.base_source()
    cat.execute(t.insert().values(
        plan_id=plan.plan_id, method=plan.method,
        base_model_id=plan.sources[base].model_id if base is not None else None,
        spec_json=json.dumps(plan.spec, default=str), plan_blob=plan.to_blob(),
        io_budget=plan.io_budget, est_bytes_base=est["base"], est_bytes_experts=est["experts"],
        est_bytes_full_experts=plan.full_expert_bytes(), est_bytes_out=est["out"],
        error_bound=plan.error_bound, error_bound_kind=plan.error_bound_kind,
        created_at=now()))
    return True


def load_plan(cat: Catalog, plan_id: str) -> Plan:
    t = schema.plans
    rows = cat.rows(sa.select(t.c.plan_id, t.c.plan_blob).where(t.c.plan_id.like(f"{plan_id}%")))
    if not rows:
        raise MergePipeError(f"no plan with id {plan_id!r}")
    if len(rows) > 1:
        raise MergePipeError(f"plan id prefix {plan_id!r} is ambiguous")
    return Plan.from_blob(rows[0]["plan_blob"])

"""Turn a merge spec into an exact Plan: every needed byte read once, in file order.

Budgeted plans start from the exact plan and drop expert blocks
(see :mod:`mergepipe.planner.budget`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.register import check_fresh, register_model
from mergepipe.catalog.store import Catalog, now
from mergepipe.errors import MergePipeError, SpecError
from mergepipe.methods.base import REQUIRED, MergeMethod
from mergepipe.planner.params import MISSING, first_resolved, gradient_t, validate_setting
from mergepipe.planner.plan import Plan, Read, Source, TensorTask
from mergepipe.planner.spec import MergeSpec, parse_spec
from mergepipe.safetensors_format import FLOAT_CODES, dtype_code, itemsize, official_order

COPY_ROLES = ("config", "generation", "tokenizer")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


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


def _numeric(key: str, value: Any, default: Any, where: str) -> Any:
    """Coerce a resolved setting to the type of the method's default."""
    if value is None:
        return None
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(value, str):  # as pydantic reads booleans: "false" is False
            if value.strip().lower() not in _BOOLS:
                raise SpecError(f"parameter {key!r} for {where}: expected true or false, "
                                f"got {value!r}")
            return _BOOLS[value.strip().lower()]
        return bool(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SpecError(f"parameter {key!r} for {where}: expected a number, got {value!r}")


@dataclass
class InputRef:
    """One non-base input of an output tensor and where its settings come from."""

    src: int                              # index into the plan's sources
    key: str                              # model name (seeds stochastic methods)
    row: dict[str, Any]                   # the input tensor's catalog row
    settings: list[dict[str, Any] | None]  # model, slice, spec parameters (highest first)


def resolve_params(method: MergeMethod, inputs: list[InputRef],
                   shared: list[dict[str, Any] | None], tensor: str, t: float,
                   layer: int | None) -> dict[str, Any]:
    """Every parameter of the method for one tensor: per-model lists and globals.

    As in mergekit, a model's filters match its own tensor name (which differs
    from the output name in frankenmerges) and merge-wide ones the output name.
    """
    out: dict[str, Any] = {}
    for key, default in method.model_params.items():
        values = []
        for inp in inputs:
            v = first_resolved(inp.settings, key, inp.row["name"], t, layer)
            if v is MISSING:
                if default is REQUIRED:
                    raise SpecError(f"parameter {key!r} is missing for model {inp.key!r} "
                                    f"(tensor {inp.row['name']!r})")
                v = default
            values.append(_numeric(key, v, default, inp.key))
        out[key] = values
    for key, default in method.global_params.items():
        v = first_resolved(shared, key, tensor, t, layer)
        if v is MISSING:
            if default is REQUIRED:
                raise SpecError(f"parameter {key!r} is missing for tensor {tensor!r}; "
                                f"method {method.name!r} needs it")
            v = default
        out[key] = _numeric(key, v, default, "the merge")
    return out


def input_tensor(tensors: dict[str, dict[str, Any]], name: str, model: str,
                 layout: dict[str, Any], layout_model: str) -> dict[str, Any]:
    """An input's tensor row, checked against the output layout's shape and dtype."""
    et = tensors.get(name)
    if et is None:
        raise MergePipeError(f"model {model!r} has no tensor {name!r} that "
                             f"{layout_model!r} has")
    shape, eshape = json.loads(layout["shape"]), json.loads(et["shape"])
    if eshape != shape:
        raise MergePipeError(f"shape mismatch for {name!r}: {shape} in {layout_model!r} "
                             f"but {eshape} in {model!r}")
    if et["dtype"] != layout["dtype"]:
        raise MergePipeError(f"dtype mismatch for {name!r}: {layout['dtype']} in "
                             f"{layout_model!r} but {et['dtype']} in {model!r}")
    return et


def make_task(method: MergeMethod, name: str, layer: int | None, t: float,
              layout: dict[str, Any], base: tuple[int, dict[str, Any]] | None,
              inputs: list[InputRef], shared: list[dict[str, Any] | None],
              out_code: str | None) -> TensorTask:
    """One output tensor: resolved parameters, and the reads the method needs."""
    shape = tuple(json.loads(layout["shape"]))
    params = resolve_params(method, inputs, shared, name, t, layer)
    reads, keys, kept, skipped = [], [], [], []
    for k, inp in enumerate(inputs):
        if method.zero_weight_skips and "weight" in params and params["weight"][k] == 0:
            skipped.append(inp.key)
            continue
        r = _read(inp.src, inp.row)
        if base is not None and inp.row["content_hash"] and \
                inp.row["content_hash"] == base[1]["content_hash"]:
            r.alias_base = True
        reads.append(r)
        keys.append(inp.key)
        kept.append(k)
    params = {key: ([v[k] for k in kept] if key in method.model_params else v)
              for key, v in params.items()}
    is_float = layout["dtype"] in FLOAT_CODES
    if method.validate is not None and is_float and reads:
        try:
            method.validate(params, keys)
        except SpecError as exc:
            raise SpecError(f"{exc} (tensor {name!r})") from None
    if base is None and not reads and is_float:
        raise SpecError(f"every model has weight 0 for tensor {name!r}")
    if not is_float:  # non-float buffers are copied from the base (or first) model
        reads, keys = ([], []) if base is not None else (reads[:1], keys[:1])
    return TensorTask(
        name=name, shape=shape, out_dtype=(out_code if is_float and out_code else layout["dtype"]),
        layer=layer, scope=method.scope_for(params) if is_float else "copy", params=params,
        base=_read(base[0], base[1]) if base is not None else None, inputs=reads,
        input_keys=keys, skipped=skipped)


def split_base(method: MergeMethod, base: dict[str, Any] | None,
               entries: list[tuple[dict[str, Any], dict[str, Any]]], where: str,
               add_missing_base: bool = True
               ) -> tuple[dict[str, Any] | None, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Apply the method's base policy to (model row, params) entries, as mergekit does.

    Methods with a base read it as the base, never as an input (a base listed
    among the models is the base). Methods without one treat a base_model as one
    more input. Returns the base actually read and the inputs, counted against
    what the method takes.
    """
    name = method.name
    if method.base == "none":
        if base is not None and add_missing_base and \
                all(row["model_id"] != base["model_id"] for row, _ in entries):
            entries = entries + [(base, {})]
        base = None
    elif base is not None:
        for row, params in entries:
            if row["model_id"] == base["model_id"] and params:
                raise SpecError(f"{where}: {row['name']!r} is the base model; its parameters "
                                f"({', '.join(sorted(params))}) have no effect for {name!r}")
        entries = [(row, p) for row, p in entries if row["model_id"] != base["model_id"]]
    seen: set[str] = set()
    for row, _ in entries:
        if row["model_id"] in seen:
            raise SpecError(f"{where}: model {row['name']!r} is listed twice")
        seen.add(row["model_id"])
    n, what = len(entries), ("models besides the base" if base is not None else "models")
    if n < method.min_models:
        raise SpecError(f"{where}: method {name!r} needs at least {method.min_models} {what}, "
                        f"got {n}")
    if method.max_models is not None and n > method.max_models:
        raise SpecError(f"{where}: method {name!r} takes at most {method.max_models} {what}, "
                        f"got {n}")
    return base, entries


def check_settings(settings: list[dict[str, Any] | None], num_layers: int) -> None:
    """Per-layer vectors must have one value per layer of the merged model."""
    for src in settings:
        for key, value in (src or {}).items():
            validate_setting(key, value, num_layers)


def make_sources(base: dict[str, Any] | None, inputs: list[dict[str, Any]]) -> list[Source]:
    """The plan's source list: the base first, then each other model once, in order."""
    out: list[Source] = []
    ids: list[str] = []
    for row, role in ([(base, "base")] if base else []) + [(r, "expert") for r in inputs]:
        if row["model_id"] not in ids:
            ids.append(row["model_id"])
            out.append(Source(row["name"], row["model_id"], row["path"], row["fingerprint"], role))
    return out


def side_files(cat: Catalog, model_id: str) -> list[str]:
    rows = cat.rows(sa.select(schema.files.c.relpath).where(
        schema.files.c.model_id == model_id, schema.files.c.role.in_(COPY_ROLES)))
    return sorted(r["relpath"] for r in rows)


def out_dtype_code(spec: MergeSpec) -> str | None:
    spec_out = spec.out_dtype or spec.dtype
    return dtype_code(spec_out) if spec_out else None


def build_exact_plan(cat: Catalog, spec_src: str | Path | dict[str, Any],
                     seed: int | None = None) -> Plan:
    spec = parse_spec(spec_src, seed)
    method = spec.method
    if spec.slices is not None:
        from mergepipe.planner.slices import build_slice_plan  # frankenmerges
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
    layout = _tensor_map(cat, layout_model["model_id"])
    input_tensors = [_tensor_map(cat, row["model_id"]) for row, _ in entries]
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


def _read(src: int, t: dict[str, Any]) -> Read:
    return Read(src=src, file=t["file"], offset=t["byte_offset"], nbytes=t["byte_length"],
                dtype=t["dtype"], content_hash=t.get("content_hash"))


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

"""What every plan builder shares: per-tensor tasks with resolved parameters,
the method's base policy, source lists and output shards.

:mod:`mergepipe.planner.exact` (model lists) and :mod:`mergepipe.planner.slices`
(layer ranges) both build their tasks from these.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog
from mergepipe.errors import MergePipeError, SpecError
from mergepipe.methods.base import REQUIRED, MergeMethod
from mergepipe.planner.params import MISSING, first_resolved, validate_setting
from mergepipe.planner.plan import Read, Source, TensorTask
from mergepipe.planner.spec import MergeSpec
from mergepipe.safetensors_format import FLOAT_CODES, dtype_code, itemsize, official_order

COPY_ROLES = ("config", "generation", "tokenizer")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def tensor_map(cat: Catalog, model_id: str) -> dict[str, dict[str, Any]]:
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
        r = tensor_read(inp.src, inp.row)
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
        layer=layer, scope=method.scope if is_float else "copy", params=params,
        base=tensor_read(base[0], base[1]) if base is not None else None, inputs=reads,
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


def tensor_read(src: int, t: dict[str, Any], check_hash: bool = True) -> Read:
    """A whole-tensor read of source ``src`` from its catalog row; with ``check_hash``
    the reader compares the bytes with the hash recorded at registration."""
    return Read(src=src, file=t["file"], offset=t["byte_offset"], nbytes=t["byte_length"],
                dtype=t["dtype"], content_hash=t.get("content_hash") if check_hash else None)


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

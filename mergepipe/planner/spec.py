"""Merge specs: mergekit-compatible YAML/dicts, validated before planning.

A mergekit config for a supported method is accepted as-is. Keys MergePipe
does not implement raise an error naming them — nothing is silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergepipe.errors import SpecError
from mergepipe.methods.base import MergeMethod, get_method
from mergepipe.planner.params import validate_setting

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
            "seed", "out_shard_size", "tokenizer_source", "name", "slices"}
UNSUPPORTED_TOP = {"modules", "tokenizer", "chat_template"}
MODEL_KEYS = {"model", "parameters"}
DEFAULT_SHARD = 5 * 10**9


@dataclass
class ModelInput:
    ref: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeSpec:
    method: MergeMethod
    base: str | None
    models: list[ModelInput]
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    seed: int
    out_shard_size: int
    raw: dict[str, Any]
    slices: list[dict[str, Any]] | None = None


def parse_size(value: Any, what: str = "size") -> int:
    """'2GiB', '500MB', '1e9', 1000 → bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    s = str(value).strip().replace("_", "")
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
             "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].lower()
    try:
        if unit not in units:
            raise ValueError
        return int(float(num) * units[unit])
    except ValueError:
        raise SpecError(f"cannot read {what} {value!r} (examples: 2GiB, 500MB, 1000000)")


def _ref(value: Any, where: str) -> str:
    if isinstance(value, (str, Path)) and str(value):
        return str(value)
    if isinstance(value, dict) and "model" in value:  # mergekit's {model: {path: …}}
        inner = value["model"]
        if isinstance(inner, dict) and "path" in inner and len(value) == 1:
            return str(inner["path"])
    raise SpecError(f"{where}: expected a model name or path, got {value!r}")


def load_spec_dict(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.exists():
        raise SpecError(f"spec file {path} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a merge spec must be a YAML mapping")
    return doc


def parse_spec(source: str | Path | dict[str, Any], seed: int | None = None) -> MergeSpec:
    """Validate a spec's structure, method and parameter names (not the models)."""
    raw = load_spec_dict(source)
    bad = set(raw) & UNSUPPORTED_TOP
    if bad:
        raise SpecError(f"spec key {sorted(bad)[0]!r} is not supported by mergepipe")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SpecError(f"unknown spec key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(TOP_KEYS))}")
    if "merge_method" not in raw:
        raise SpecError("spec has no merge_method")
    method = get_method(str(raw["merge_method"]))
    ts = raw.get("tokenizer_source")
    if ts not in (None, "base"):
        raise SpecError(f"tokenizer_source {ts!r} is not supported (only 'base'); "
                        f"the tokenizer is copied from the base model")
    if raw.get("slices") is not None and raw.get("models") is not None:
        raise SpecError("spec has both 'slices' and 'models'; use one")
    models: list[ModelInput] = []
    for i, m in enumerate(raw.get("models") or []):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise SpecError(f"models[{i}]: expected a mapping with 'model'")
        extra = set(m) - MODEL_KEYS
        if extra:
            raise SpecError(f"models[{i}]: unknown key {sorted(extra)[0]!r}")
        params = m.get("parameters") or {}
        _check_params(method, params, f"models[{i}].parameters", per_model=True)
        models.append(ModelInput(_ref(m["model"], f"models[{i}]"), dict(params)))
    if raw.get("slices") is None and not models:
        raise SpecError("spec lists no models")
    parameters = dict(raw.get("parameters") or {})
    _check_params(method, parameters, "parameters", per_model=False)
    base = _ref(raw["base_model"], "base_model") if raw.get("base_model") else None
    if method.base == "required" and base is None:
        raise SpecError(f"method {method.name!r} needs a base_model")
    n = len(models)
    if models and n < method.min_models:
        raise SpecError(f"method {method.name!r} needs at least {method.min_models} models, got {n}")
    if models and method.max_models is not None and n > method.max_models:
        raise SpecError(f"method {method.name!r} takes at most {method.max_models} models, got {n}")
    spec_seed = raw.get("seed", 0) if seed is None else seed
    try:
        spec_seed = int(spec_seed)
    except (TypeError, ValueError):
        raise SpecError(f"seed must be an integer, got {spec_seed!r}")
    return MergeSpec(
        method=method, base=base, models=models, parameters=parameters,
        dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"), seed=spec_seed,
        out_shard_size=parse_size(raw.get("out_shard_size", DEFAULT_SHARD), "out_shard_size"),
        raw=raw, slices=raw.get("slices"))


def _check_params(method: MergeMethod, params: Any, where: str, per_model: bool) -> None:
    if not isinstance(params, dict):
        raise SpecError(f"{where}: expected a mapping of parameters")
    allowed = set(method.model_params) | (set() if per_model else set(method.global_params))
    if per_model:
        allowed |= set(method.global_params)  # mergekit lets these appear per model too
    for key, value in params.items():
        if key not in allowed:
            raise SpecError(f"{where}: unknown parameter {key!r} for method {method.name!r}"
                            f" (known: {', '.join(sorted(allowed)) or 'none'})")
        validate_setting(key, value, None)

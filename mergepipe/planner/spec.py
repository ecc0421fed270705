"""Merge specs: mergekit-compatible YAML/dicts, validated before planning.

A mergekit config for a supported method is accepted as-is. Keys MergePipe
does not implement raise an error naming them — nothing is silently ignored.
"""
from __future__ import annotations

import math
import numbers
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
SLICE_KEYS = {"sources", "base_model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
DEFAULT_SHARD = 5 * 10**9
MAX_SPEC_BYTES = 1 << 20          # a merge spec is a few KiB; refuse anything near this
MAX_SPEC_NODES = 100_000          # values after YAML aliases are expanded
MAX_SPEC_CHARS = 1 << 20          # characters of text after aliases are expanded
OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass
class ModelInput:
    ref: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One model's contiguous run of layers inside an output slice."""

    ref: str
    layer_range: tuple[int, int]
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    """An output slice: the same number of layers from each source, merged."""

    sources: list[SliceSource]
    base: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        a, b = self.sources[0].layer_range
        return b - a


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
    slices: list[SliceSpec] | None = None


def parse_size(value: Any, what: str = "size") -> int:
    """'2GiB', '500MB', '1e9', 1000 → a positive number of bytes."""
    n = _parse_size(value, what)
    if n <= 0:
        raise SpecError(f"{what} must be positive, got {value!r}")
    return n


def _parse_size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(f"cannot read {what} {value!r} (examples: 2GiB, 500MB, 1000000)")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise SpecError(f"{what} must be a finite size, got {value!r}")
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
        size = float(num) * units[unit]
        if not math.isfinite(size):
            raise SpecError(f"{what} must be a finite size, got {value!r}")
        return int(size)
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
    """The spec as a mapping: a small UTF-8 YAML file whose aliases do not blow up."""
    if isinstance(source, dict):
        check_spec_size(source, "spec")
        return source
    path = Path(source)
    try:
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise SpecError(f"spec file {path} {what}")
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"spec file {path} is {path.stat().st_size} bytes; a merge spec "
                            f"must be under {MAX_SPEC_BYTES} bytes")
        text = path.read_bytes()[:MAX_SPEC_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {path}: {exc.strerror or exc}")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply")
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a merge spec must be a YAML mapping")
    check_spec_size(doc, str(path))
    return doc


def check_spec_size(doc: Any, where: str) -> None:
    """Refuse a spec that expands (through YAML aliases or self-reference) past
    MAX_SPEC_NODES values or MAX_SPEC_CHARS characters: it would be stored and
    hashed whole."""
    nodes, chars, stack = 0, 0, [doc]
    while stack:
        item = stack.pop()
        nodes += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            chars += len(str(item)) if isinstance(item, str) else 8
        if nodes > MAX_SPEC_NODES or chars > MAX_SPEC_CHARS:
            raise SpecError(f"{where}: the spec expands to more than {MAX_SPEC_NODES} values or "
                            f"{MAX_SPEC_CHARS} characters (YAML aliases?); refusing it")


def parse_spec(source: str | Path | dict[str, Any], seed: int | None = None) -> MergeSpec:
    """Validate a spec's structure, method and parameter names (not the models)."""
    raw = load_spec_dict(source)
    odd = [k for k in raw if not isinstance(k, str)]
    if odd:
        raise SpecError(f"spec key {odd[0]!r} is not a name")
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
            raise SpecError(f"models[{i}]: unknown key {sorted(map(str, extra))[0]!r}")
        params = m.get("parameters") or {}
        _check_params(method, params, f"models[{i}].parameters", per_model=True)
        models.append(ModelInput(_ref(m["model"], f"models[{i}]"), dict(params)))
    slices = _parse_slices(method, raw["slices"]) if raw.get("slices") is not None else None
    if slices is None and not models:
        raise SpecError("spec lists no models")
    parameters = raw.get("parameters") or {}
    _check_params(method, parameters, "parameters", per_model=False)
    parameters = dict(parameters)
    base = _ref(raw["base_model"], "base_model") if raw.get("base_model") else None
    if method.base == "required" and base is None and \
            (slices is None or any(s.base is None for s in slices)):
        raise SpecError(f"method {method.name!r} needs a base_model")
    spec_seed = _seed(raw.get("seed", 0) if seed is None else seed)
    for key in ("dtype", "out_dtype"):
        _check_dtype(key, raw.get(key))
    if raw.get("name") is not None and not isinstance(raw["name"], str):
        raise SpecError(f"name must be a string, got {raw['name']!r}")
    return MergeSpec(
        method=method, base=base, models=models, parameters=parameters,
        dtype=raw.get("dtype"), out_dtype=raw.get("out_dtype"), seed=spec_seed,
        out_shard_size=parse_size(raw.get("out_shard_size", DEFAULT_SHARD), "out_shard_size"),
        raw=raw, slices=slices)


def _seed(value: Any) -> int:
    """An integer seed (a digit string as YAML may give it); not a boolean, not 1.5."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            not 0 <= value < 2**63:
        raise SpecError(f"seed must be a non-negative integer, got {value!r}")
    return int(value)


def _check_dtype(key: str, value: Any) -> None:
    """Merged weights are written as one of the float types the engine computes in."""
    if value is None:
        return
    from mergepipe.safetensors_format import FLOAT_CODES, dtype_code
    try:
        ok = isinstance(value, str) and dtype_code(value) in FLOAT_CODES
    except ValueError:
        ok = False
    if not ok:
        raise SpecError(f"{key} {value!r} is not supported; use one of {', '.join(OUT_DTYPES)}")


def _parse_slices(method: MergeMethod, value: Any) -> list[SliceSpec]:
    if not isinstance(value, list) or not value:
        raise SpecError("slices: expected a non-empty list of {sources: [...]}")
    out = []
    for i, sl in enumerate(value):
        where = f"slices[{i}]"
        if not isinstance(sl, dict) or "sources" not in sl:
            raise SpecError(f"{where}: expected a mapping with 'sources'")
        extra = set(sl) - SLICE_KEYS
        if extra:
            key = sorted(map(str, extra))[0]
            why = " (mergekit accepts it but ignores it)" if key == "residual_weight" else ""
            raise SpecError(f"{where}: unsupported key {key!r}{why}")
        params = sl.get("parameters") or {}
        _check_params(method, params, f"{where}.parameters", per_model=False)
        if not isinstance(sl["sources"], list) or not sl["sources"]:
            raise SpecError(f"{where}.sources: expected a non-empty list")
        sources = [_parse_source(method, src, f"{where}.sources[{j}]")
                   for j, src in enumerate(sl["sources"])]
        lengths = {b - a for a, b in (s.layer_range for s in sources)}
        if len(lengths) != 1:
            raise SpecError(f"{where}: every source must span the same number of layers, got "
                            f"{[list(s.layer_range) for s in sources]}")
        base = _ref(sl["base_model"], f"{where}.base_model") if sl.get("base_model") else None
        out.append(SliceSpec(sources, base, dict(params)))
    return out


def _parse_source(method: MergeMethod, src: Any, where: str) -> SliceSource:
    if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
        raise SpecError(f"{where}: expected a mapping with 'model' and 'layer_range'")
    extra = set(src) - SOURCE_KEYS
    if extra:
        raise SpecError(f"{where}: unknown key {sorted(map(str, extra))[0]!r}")
    lr = src["layer_range"]
    if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, int) and
                                                          not isinstance(v, bool) for v in lr)
            and 0 <= lr[0] < lr[1]):
        raise SpecError(f"{where}.layer_range: expected [start, end) with 0 <= start < end, "
                        f"got {lr!r}")
    params = src.get("parameters") or {}
    _check_params(method, params, f"{where}.parameters", per_model=True)
    return SliceSource(_ref(src["model"], where), (lr[0], lr[1]), dict(params))


def _check_params(method: MergeMethod, params: Any, where: str, per_model: bool) -> None:
    """Names and shapes of settings; one model's own block takes per-model parameters only.

    mergekit reads a merge-wide parameter (``normalize``, ``t``, ...) only from
    slice or top-level ``parameters`` and silently drops it from a model's
    block; MergePipe says so instead.
    """
    if not isinstance(params, dict):
        raise SpecError(f"{where}: expected a mapping of parameters")
    allowed = set(method.model_params) | (set() if per_model else set(method.global_params))
    for key, value in params.items():
        if per_model and key in method.global_params:
            raise SpecError(f"{where}: {key!r} applies to the whole merge, not to one model; "
                            f"set it under the top-level (or slice) 'parameters'")
        if key not in allowed:
            raise SpecError(f"{where}: unknown parameter {key!r} for method {method.name!r}"
                            f" (known: {', '.join(sorted(allowed)) or 'none'})")
        default = method.model_params.get(key, method.global_params.get(key))
        validate_setting(key, value, None, "bool" if isinstance(default, bool) else "number")

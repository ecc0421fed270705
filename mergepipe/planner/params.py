"""Resolve a parameter setting for one tensor, the way mergekit reads configs.

Forms accepted:
  * a scalar;
  * a list of numbers — a gradient interpolated at position ``t`` of the
    slice (layer i of an n-layer slice has t = i / (n − 1), or 1 when n = 1;
    embeddings, final norm and head have t = 0, so they take the first value);
  * ``{filter, value}`` or a list of them — the first filter that is a
    substring of the tensor name wins (``*`` or no filter matches everything);
    a value may itself be a gradient;
  * MergePipe's per-layer vector ``{layers: [v_0 … v_{L−1}], default: v}`` —
    indexed by the exact output layer; tensors outside layers take ``default``.
    Meant for search loops, where one coefficient per layer is the natural unit.

Settings are looked up in a list of sources from highest to lowest precedence
(a model's own parameters, then its slice's, then the spec's); a source whose
filters all miss passes the lookup on to the next one, as in mergekit.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from mergepipe.errors import SpecError

MISSING = object()
_SCALARS = (int, float, bool, str, numbers.Real)
# fractions of a tensor's entries: anything outside [0, 1] has no meaning
UNIT_INTERVAL = {"density", "gamma", "epsilon"}
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}


def gradient_t(index: int, count: int) -> float:
    """mergekit's position of layer ``index`` inside a slice of ``count`` layers."""
    return index / (count - 1) if count > 1 else 1.0


def _as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, str):  # YAML 1.1 reads "1e-3" as a string; mergekit coerces it
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _is_condition(value: Any) -> bool:
    return isinstance(value, dict) and "value" in value and not set(value) - {"filter", "value"}


def check_scalar(name: str, value: Any, kind: str | None) -> None:
    """One leaf value: a finite number of the right type (a boolean is not a number),
    inside [0, 1] for fractions; or true/false for a switch. ``kind`` is "number",
    "bool", or None when the parameter's type is not known here (finiteness only)."""
    if kind == "bool":
        if isinstance(value, bool) or (isinstance(value, str) and
                                       value.strip().lower() in BOOL_WORDS) or \
                (isinstance(value, numbers.Real) and value in (0, 1)):
            return
        raise SpecError(f"parameter {name!r}: expected true or false, got {value!r}")
    if isinstance(value, bool) or (isinstance(value, str) and kind is None):
        if kind == "number":
            raise SpecError(f"parameter {name!r}: expected a number, got {value!r} (a boolean)")
        return
    x = _as_number(value)
    if x is None:
        raise SpecError(f"parameter {name!r}: expected a number, got {value!r}")
    if not math.isfinite(x):
        raise SpecError(f"parameter {name!r}: {value!r} is not a finite number")
    if name in UNIT_INTERVAL and not 0.0 <= x <= 1.0:
        raise SpecError(f"parameter {name!r}: {value!r} is outside [0, 1]")


def validate_setting(name: str, value: Any, num_layers: int | None = None,
                     kind: str | None = None) -> None:
    """Reject malformed settings at plan time with a message naming the parameter."""
    if isinstance(value, _SCALARS):
        check_scalar(name, value, kind)
        return
    if _is_condition(value):
        _check_filter(name, value)
        _validate_value(name, value["value"], num_layers, kind)
        return
    if isinstance(value, dict):
        if set(value) - {"layers", "default"} or "layers" not in value:
            raise SpecError(f"parameter {name!r}: a mapping must be {{filter, value}} or "
                            f"{{layers: [...], default: v}}, got keys {sorted(map(str, value))}")
        layers = value["layers"]
        if not isinstance(layers, list) or not layers or \
                not all(_as_number(v) is not None for v in layers):
            raise SpecError(f"parameter {name!r}: 'layers' must be a list of numbers")
        for v in layers:
            check_scalar(name, v, kind)
        if "default" in value and not isinstance(value["default"], _SCALARS):
            raise SpecError(f"parameter {name!r}: 'default' must be a single value")
        if "default" in value:
            check_scalar(name, value["default"], kind)
        if num_layers is not None and len(layers) != num_layers:
            raise SpecError(f"parameter {name!r}: per-layer list has {len(layers)} values "
                            f"but the merged model has {num_layers} layers")
        return
    if isinstance(value, list):
        if not value:
            raise SpecError(f"parameter {name!r}: empty list")
        if all(isinstance(v, _SCALARS) for v in value):
            for v in value:
                check_scalar(name, v, kind)
            return
        for cond in value:
            if not _is_condition(cond):
                raise SpecError(f"parameter {name!r}: list items must all be numbers or "
                                f"{{filter, value}} mappings, got {cond!r}")
            _check_filter(name, cond)
            _validate_value(name, cond["value"], num_layers, kind)
        return
    raise SpecError(f"parameter {name!r}: unsupported value {value!r}")


def _check_filter(name: str, cond: dict[str, Any]) -> None:
    flt = cond.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise SpecError(f"parameter {name!r}: filter must be a string, got {flt!r}")


def _validate_value(name: str, value: Any, num_layers: int | None,
                    kind: str | None = None) -> None:
    """A filtered value: a scalar, a gradient, or a per-layer vector (no nested filters)."""
    if isinstance(value, list) and not all(isinstance(v, _SCALARS) for v in value):
        raise SpecError(f"parameter {name!r}: a filter's value must be a number or a "
                        f"list of numbers, not {value!r}")
    if _is_condition(value):
        raise SpecError(f"parameter {name!r}: filters cannot be nested")
    validate_setting(name, value, num_layers, kind)


def _gradient(values: list[Any], t: float) -> Any:
    nums = [_as_number(v) for v in values]
    if any(n is None for n in nums):  # booleans/strings select, numbers interpolate
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(nums) - 1)
    i0 = int(scaled)
    i1 = min(len(nums) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * nums[i0] + frac * nums[i1]  # type: ignore[operator]


def resolve_setting(value: Any, tensor: str, t: float, layer: int | None) -> Any:
    """The setting's value for one tensor, or MISSING when no filter matches."""
    if isinstance(value, _SCALARS):
        return value
    if _is_condition(value):
        value = [value]
    if isinstance(value, dict):
        if layer is None:
            return value.get("default", MISSING)
        if layer >= len(value["layers"]):
            raise SpecError(f"per-layer list has {len(value['layers'])} values but tensor "
                            f"{tensor!r} is in layer {layer}")
        return value["layers"][layer]
    if all(isinstance(v, _SCALARS) for v in value):
        return _gradient(value, t)
    for cond in value:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor:
            return resolve_setting(cond["value"], tensor, t, layer)
    return MISSING


def first_resolved(sources: list[dict[str, Any] | None], key: str, tensor: str, t: float,
                   layer: int | None) -> Any:
    """Walk settings from highest to lowest precedence; MISSING if none applies."""
    for src in sources:
        if src and key in src:
            v = resolve_setting(src[key], tensor, t, layer)
            if v is not MISSING:
                return v
    return MISSING

"""Resolve a parameter setting for one tensor, the way mergekit reads configs.

Forms accepted:
  * a scalar;
  * a list of numbers — a gradient interpolated over the layers of the slice
    (t = layer / (num_layers − 1); tensors outside layers use t = 0);
  * a list of ``{filter, value}`` — first filter that is a substring of the
    tensor name wins (``*`` or no filter matches everything);
  * MergePipe's per-layer vector ``{layers: [v_0 … v_{L−1}], default: v}`` —
    exact layer index; tensors outside layers (embeddings, final norm, head)
    take ``default``. Meant for search loops.
"""
from __future__ import annotations

from typing import Any

from mergepipe.errors import SpecError

MISSING = object()


def validate_setting(name: str, value: Any, num_layers: int | None) -> None:
    """Reject malformed settings at plan time with a message naming the parameter."""
    if isinstance(value, (int, float, bool, str)):
        return
    if isinstance(value, dict):
        if set(value) - {"layers", "default"} or "layers" not in value:
            raise SpecError(f"parameter {name!r}: a mapping must be "
                            f"{{layers: [...], default: v}}, got keys {sorted(value)}")
        layers = value["layers"]
        if not isinstance(layers, list) or not all(isinstance(v, (int, float)) for v in layers):
            raise SpecError(f"parameter {name!r}: 'layers' must be a list of numbers")
        if num_layers is not None and len(layers) != num_layers:
            raise SpecError(f"parameter {name!r}: per-layer list has {len(layers)} values "
                            f"but the model has {num_layers} layers")
        return
    if isinstance(value, list):
        if not value:
            raise SpecError(f"parameter {name!r}: empty list")
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return
        for cond in value:
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise SpecError(f"parameter {name!r}: list items must all be numbers or "
                                f"{{filter, value}} mappings")
            validate_setting(name, cond["value"], num_layers)
        return
    raise SpecError(f"parameter {name!r}: unsupported value {value!r}")


def resolve_setting(value: Any, tensor: str, layer: int | None, num_layers: int | None,
                    layer_base: int = 0) -> Any:
    """The setting's value for one tensor, or MISSING when no filter matches."""
    if isinstance(value, (int, float, bool, str)):
        return value
    if isinstance(value, dict):
        if layer is None:
            return value.get("default", MISSING)
        return value["layers"][layer]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        t = 0.0
        if layer is not None and num_layers and num_layers > 1:
            t = (layer - layer_base) / (num_layers - 1)
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    for cond in value:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in tensor:
            return resolve_setting(cond["value"], tensor, layer, num_layers, layer_base)
    return MISSING


def first_resolved(sources: list[dict[str, Any] | None], key: str, tensor: str,
                   layer: int | None, num_layers: int | None) -> Any:
    """Walk settings from highest to lowest precedence; MISSING if none applies."""
    for src in sources:
        if src and key in src:
            v = resolve_setting(src[key], tensor, layer, num_layers)
            if v is not MISSING:
                return v
    return MISSING

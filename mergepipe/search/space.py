"""The layer-wise decision space: one merge coefficient per layer group plus the head.

A candidate ``x`` in [0, 1]^d becomes a task-arithmetic spec
``base + x_l · (reasoning − base)``. Layers are addressed by exact index in the
spec (``weight.layers[l]``), so the coefficient of layer 12 never leaks into
layer 1 or 120 — the defect the AP-BMM release had with unanchored patterns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class LayerSpace:
    """``num_layers`` transformer layers cut into contiguous groups of ``group_size``.

    The last coordinate is the coefficient for every tensor outside the layers
    (embeddings, final norm, head), which the planner reads as ``default``.
    """

    num_layers: int
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError("a layer space needs at least one layer")
        if self.group_size < 1:
            raise ValueError("group_size must be at least 1")

    @property
    def num_groups(self) -> int:
        return -(-self.num_layers // self.group_size)

    @property
    def dim(self) -> int:
        return self.num_groups + 1

    def group_of(self, layer: int) -> int:
        return layer // self.group_size

    def groups(self) -> list[list[int]]:
        """Layer indices of each group, in order."""
        return [list(range(g * self.group_size, min((g + 1) * self.group_size, self.num_layers)))
                for g in range(self.num_groups)]

    def names(self) -> list[str]:
        """Human-readable name of each coordinate (for plots and stored priors)."""
        out = []
        for layers in self.groups():
            out.append(f"layer {layers[0]}" if len(layers) == 1
                       else f"layers {layers[0]}-{layers[-1]}")
        return out + ["head"]

    def check(self, x: Sequence[float]) -> list[float]:
        vals = [float(v) for v in x]
        if len(vals) != self.dim:
            raise ValueError(f"decision vector has {len(vals)} values, the space has {self.dim}")
        return [min(1.0, max(0.0, v)) for v in vals]

    def layer_weights(self, x: Sequence[float]) -> tuple[list[float], float]:
        """Per-layer coefficients (expanded from groups) and the head coefficient."""
        vals = self.check(x)
        return [vals[self.group_of(l)] for l in range(self.num_layers)], vals[-1]

    def to_spec(self, x: Sequence[float], base: str, reasoning: str,
                dtype: str = "float32") -> dict[str, Any]:
        """The task-arithmetic merge spec the planner accepts for candidate ``x``."""
        layers, head = self.layer_weights(x)
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": reasoning,
                        "parameters": {"weight": {"layers": layers, "default": head}}}],
            "dtype": dtype,
        }

    def reduce_per_layer(self, per_layer: Sequence[float], head: float) -> list[float]:
        """Average a per-layer quantity over each group and append the head value."""
        return [sum(per_layer[l] for l in ls) / len(ls) for ls in self.groups()] + [float(head)]


def model_level_spec(method: str, weight: float, base: str, reasoning: str,
                     density: float | None = None, dtype: str = "float32") -> dict[str, Any]:
    """A model-level spec with one global weight (the grid baselines)."""
    params: dict[str, Any] = {"weight": float(weight)}
    if density is not None:
        params["density"] = float(density)
    spec: dict[str, Any] = {"merge_method": method, "base_model": base,
                            "models": [{"model": reasoning, "parameters": params}],
                            "dtype": dtype}
    if method == "ties":
        # One expert: with normalisation the weight would cancel out of the merge.
        spec["parameters"] = {"normalize": False}
    return spec

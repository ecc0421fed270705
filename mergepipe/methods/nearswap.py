"""NearSwap: take the other model's value where it is near the base's.

Per entry, weight = clamp(t / |base − x|, 0, 1): entries that differ by less
than ``t`` are swapped in fully, larger differences only in proportion. The
rule is elementwise, so it streams row blocks.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register


def nearswap(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
             params: dict[str, Any]) -> torch.Tensor:
    assert base is not None
    (x,) = tensors
    weight = (float(params["t"]) / torch.abs(base - x).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * x + (1 - weight) * base


register(MergeMethod(
    name="nearswap", fn=nearswap,
    global_params={"t": REQUIRED},
    base="required", scope="block", min_models=1, max_models=1,
    description="the other model's values where they lie within t of the base's",
))

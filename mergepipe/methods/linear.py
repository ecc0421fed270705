"""Linear (weighted average) merge: sum_k w_k·x_k, divided by sum_k w_k when normalising."""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register


def linear(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
           params: dict[str, Any]) -> torch.Tensor:
    weights = params["weight"]
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights):
        out.add_(x, alpha=float(w))
    if params["normalize"]:
        out.div_(sum(float(w) for w in weights))
    return out


register(MergeMethod(
    name="linear", fn=linear,
    model_params={"weight": REQUIRED},
    global_params={"normalize": True},
    base="none", scope="block", bound_kind="exact", zero_weight_skips=True,
    description="weighted average of the models",
))

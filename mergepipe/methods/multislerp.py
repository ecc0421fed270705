"""Multi-SLERP: a weighted mean of several models (or task vectors) on the hypersphere.

Each input becomes a unit vector; they are averaged in the tangent space at
their normalised weighted mean and mapped back with the exponential map, then
scaled by the weighted mean of the inputs' norms. With a base model the task
vectors are interpolated and added back. Norms cover the whole tensor, so the
method runs at tensor scope. Reductions use :mod:`.reduce`: torch's (and
mergekit's) bits below the parallel grain, thread-independent bits above it.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.errors import MergePipeError
from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register
from mergepipe.methods.reduce import norm_last, sum_last


def multislerp(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
               params: dict[str, Any]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    eps = float(params["eps"])
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor([float(w) for w in params["weight"]], dtype=flat.dtype)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = norm_last(flat).unsqueeze(-1)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = norm_last(mean)
    if mean_norm < eps:
        if len(tensors) == 2:  # opposite inputs: fall back to linear interpolation
            res = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return res if base is None else res + base
        raise MergePipeError(f"multislerp: tensor {ctx.name!r}: the weighted mean of the "
                             f"inputs' directions is zero (opposite inputs balanced by their "
                             f"weights); use other weights")
    mean = mean / mean_norm
    dots = sum_last(units * mean).unsqueeze(-1)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = norm_last(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return result if base is None else result + base


register(MergeMethod(
    name="multislerp", fn=multislerp,
    model_params={"weight": REQUIRED},
    global_params={"normalize_weights": True, "eps": 1e-8},
    base="optional", scope="tensor", min_models=1,
    description="weighted spherical mean of several models (or of their task vectors)",
))

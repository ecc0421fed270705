"""Linear (weighted average) merge: sum_k w_k·x_k, divided by sum_k w_k when normalising.

As in mergekit, every listed model is an input — a ``base_model`` too, which
then needs a weight like any other model (the method has no notion of a base).
Weights are applied as float32 coefficients in input order, as mergekit does,
so float32 results agree bit for bit.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register


def linear(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
           params: dict[str, Any]) -> torch.Tensor:
    weights = torch.tensor([float(w) for w in params["weight"]], dtype=tensors[0].dtype,
                           device=tensors[0].device)
    out = torch.zeros_like(tensors[0])
    for x, w in zip(tensors, weights.unbind(0)):
        out.addcmul_(x, w)
    if params["normalize"]:
        out.div_(weights.sum())
    return out


register(MergeMethod(
    name="linear", fn=linear,
    model_params={"weight": REQUIRED},
    global_params={"normalize": True},
    base="none", scope="block", bound_kind="exact", zero_weight_skips=True,
    description="weighted average of the models",
))

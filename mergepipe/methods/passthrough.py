"""Passthrough: copy one model's tensors, optionally scaled.

With ``slices`` this builds frankenmerges: each output layer is a layer of
one source model. It reads exactly one model per tensor.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import MergeMethod, TensorContext, register


def passthrough(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
                params: dict[str, Any]) -> torch.Tensor:
    (x,) = tensors
    scale = params["scale"][0]
    return x if scale is None else x * float(scale)


register(MergeMethod(
    name="passthrough", fn=passthrough,
    model_params={"scale": None},
    base="none", scope="block", bound_kind="exact", min_models=1, max_models=1,
    description="one model's tensors, optionally scaled (frankenmerges with slices)",
))

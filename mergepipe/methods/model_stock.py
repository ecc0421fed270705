"""Model Stock: move from the base towards the experts' average by their agreement.

The interpolation ratio t = k·cos / (1 + (k − 1)·cos) comes from the mean
pairwise cosine between the experts' task vectors — over the whole tensor, or
per output row with ``filter_wise`` — so it needs whole tensors (tensor scope).
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import MergeMethod, TensorContext, register
from mergepipe.methods.reduce import norm_last, sum_last


def model_stock(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
                params: dict[str, Any]) -> torch.Tensor:
    assert base is not None and len(tensors) >= 2
    shape = base.shape
    if params["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in tensors]
    deltas = [x - w0 for x in ws]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1:]:
            norms = norm_last(a) * norm_last(b)
            cosines.append((sum_last(a * b) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6  # opposing experts: keep the base
    safe = torch.where(singular, torch.ones_like(denom), denom)
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / safe)
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


register(MergeMethod(
    name="model_stock", fn=model_stock,
    global_params={"filter_wise": False},
    base="required", scope="tensor", min_models=2,
    description="base-to-average interpolation set by the experts' mutual agreement",
))

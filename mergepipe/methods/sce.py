"""SCE: select, calculate, erase — task vectors weighted by their own energy.

Optionally keep only the ``select_topk`` fraction of entries where the experts'
task vectors vary most (variance across experts); weight each expert by its
mean squared task vector; erase entries disagreeing with the majority sign;
average what is left. The weights and the selection need whole tensors, so the
method runs at tensor scope.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import MergeMethod, TensorContext, register


def _select_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the top ``density`` fraction (of nonzero-variance entries) by variance."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[indices] = 1
    return mask


def _energy_weights(tvs: torch.Tensor) -> torch.Tensor:
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    weight_sum = torch.sum(weights).item()
    if abs(weight_sum) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / weight_sum


def sce(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
        params: dict[str, Any]) -> torch.Tensor:
    assert base is not None
    if not tensors:
        return base
    tvs = torch.stack([t - base for t in tensors], dim=0)
    topk = float(params["select_topk"])
    if topk < 1:
        tvs = tvs * _select_mask(tvs, topk).unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = tvs.sign() == majority
    weights = _energy_weights(tvs)
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


register(MergeMethod(
    name="sce", fn=sce,
    global_params={"select_topk": 1.0, "int8_mask": False},
    base="required", scope="tensor", min_models=1,
    description="variance-selected, energy-weighted task vectors with sign consensus",
))

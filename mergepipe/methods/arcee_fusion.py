"""Arcee Fusion: take the other model's changes only where they matter most.

Importance of an entry = |x − base| times the KL divergence between the rows'
softmaxes; entries at or above median + 1.5·IQR of the importances take the
other model's value, the rest keep the base's. The quartiles come from the
sorted importances — of a sample of 10⁶ of them on larger tensors, drawn (with
replacement) from ``ctx.generator``, where mergekit uses torch's global
generator: so the method is exact (and equal to mergekit) up to 10⁶ entries
per tensor and seeded-random beyond. Tensor scope.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mergepipe.methods.base import MergeMethod, TensorContext, register

SAMPLE = 1_000_000


def _importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    eps = 1e-8
    p = F.softmax(x, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


def _threshold(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=gen)]
    ordered, _ = torch.sort(flat)
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    return median + 1.5 * (q3 - q1)


def arcee_fusion(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
                 params: dict[str, Any]) -> torch.Tensor:
    assert base is not None
    (x,) = tensors
    scores = _importance(x, base)
    mask = (scores >= _threshold(scores, ctx.generator(0))).float()
    return base + (x - base) * mask


register(MergeMethod(
    name="arcee_fusion", fn=arcee_fusion,
    base="required", scope="tensor", min_models=1, max_models=1, stochastic=True,
    description="the other model's changes where their importance is an upper outlier",
))

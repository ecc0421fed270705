"""NuSLERP: spherical interpolation of two models, or of their task vectors.

``t`` comes from the two weights (w1 / (w0 + w1)). With a base model the two
task vectors are interpolated and added back to the base. By default each
tensor is one flat vector (``nuslerp_flatten``); otherwise rows are
interpolated separately (or columns, with ``nuslerp_row_wise``).
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register
from mergepipe.methods.reduce import norm_last, sum_last

EPS = 1e-8


def _unit(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    return x / norm_last(x).unsqueeze(-1).clamp(min=eps)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp along the last dimension; near-parallel pairs are linearly interpolated."""
    cos = sum_last(_unit(v0) * _unit(v1)).unsqueeze(-1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    return torch.where(colinear, (1 - t) * v0 + t * v1, res)


def interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, flatten: bool,
                row_wise: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        return nuslerp_vectors(t, v0.reshape(-1), v1.reshape(-1)).reshape(shape)
    if row_wise:
        out = nuslerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1))
        return out.transpose(0, -1).reshape(shape)
    return nuslerp_vectors(t, v0, v1).reshape(shape)


def nuslerp(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
            params: dict[str, Any]) -> torch.Tensor:
    w0, w1 = (float(w) for w in params["weight"])
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    flatten, row_wise = bool(params["nuslerp_flatten"]), bool(params["nuslerp_row_wise"])
    a, b = tensors
    if base is None:
        return interpolate(t, a, b, flatten, row_wise)
    return base + interpolate(t, a - base, b - base, flatten, row_wise)


register(MergeMethod(
    name="nuslerp", fn=nuslerp,
    model_params={"weight": REQUIRED},
    global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
    base="optional", scope="tensor", min_models=2, max_models=2,
    description="spherical interpolation of two models (or of their task vectors)",
))

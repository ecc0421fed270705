"""SLERP: spherical interpolation between the base and one other model.

Each tensor is treated as one flat vector. ``t`` = 0 gives the base, 1 the
other model; nearly parallel vectors fall back to linear interpolation. The
angle needs both tensors' norms, so the method runs at tensor scope. Norms and
dot products are reduced over 2**20-element chunks, as mergekit does, and each
chunk with a thread-count-independent reduction (:mod:`.reduce`).
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register
from mergepipe.methods.reduce import norm_last, sum_last

CHUNK = 1 << 20
DOT_THRESHOLD = 0.9995
EPS = 1e-8


def _chunked_norm(x: torch.Tensor) -> torch.Tensor:
    parts = [norm_last(x[i:i + CHUNK]) for i in range(0, x.numel(), CHUNK)]
    return torch.linalg.vector_norm(torch.stack(parts))


def slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Interpolate flat float32 vectors v0 → v1 along the great circle."""
    tt = torch.tensor(t, dtype=v0.dtype, device=v0.device)
    if v0.numel() == 0:
        return (1 - tt) * v0 + tt * v1
    n0 = _chunked_norm(v0)
    n1 = _chunked_norm(v1)
    n0 = torch.where(n0 > EPS, n0, torch.ones_like(n0))
    n1 = torch.where(n1 > EPS, n1, torch.ones_like(n1))
    parts = [sum_last((v0[i:i + CHUNK] / n0) * (v1[i:i + CHUNK] / n1))
             for i in range(0, v0.numel(), CHUNK)]
    dot = torch.stack(parts).sum().clamp(-1, 1)
    if bool(dot.abs() > DOT_THRESHOLD):
        c0, c1 = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        c0 = torch.sin((1 - tt) * theta) / sin_theta
        c1 = torch.sin(tt * theta) / sin_theta
    return c0 * v0 + c1 * v1


def slerp(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
          params: dict[str, Any]) -> torch.Tensor:
    assert base is not None and len(tensors) == 1
    out = slerp_vectors(float(params["t"]), base.reshape(-1), tensors[0].reshape(-1))
    return out.reshape(base.shape)


register(MergeMethod(
    name="slerp", fn=slerp,
    global_params={"t": REQUIRED},
    base="required", scope="tensor", min_models=1, max_models=1,
    description="spherical interpolation from the base (t=0) to the other model (t=1)",
))

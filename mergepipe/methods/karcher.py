"""Karcher mean: the Riemannian centre of mass of the models on the hypersphere.

Each tensor is one flat vector split into norm and direction; the mean
direction is found by at most ``max_iter`` fixed-point steps (stopping below
``tol``) and scaled by the mean norm. Every step needs whole-tensor dot
products, so the method runs at tensor scope. Like mergekit, it has no base:
a ``base_model`` is one more input, and all inputs weigh the same.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.methods.base import MergeMethod, TensorContext, register
from mergepipe.methods.reduce import norm_last


def _norm(x: torch.Tensor) -> torch.Tensor:
    return norm_last(x.reshape(-1))


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int,
                 tol: float) -> torch.Tensor:
    norms = [_norm(t) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else t / n for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(t * 0 for t in tensors)
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]
    points = [units[i] for i in valid]
    mean = torch.zeros_like(points[0])
    for a, u in zip(weights, points):
        mean += a * u
    mean_norm = _norm(mean)
    mean = points[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = _norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = _norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher(ctx: TensorContext, base: torch.Tensor | None, tensors: list[torch.Tensor],
            params: dict[str, Any]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, alphas, int(params["max_iter"]), float(params["tol"]))


register(MergeMethod(
    name="karcher", fn=karcher,
    global_params={"max_iter": 10, "tol": 1e-5},
    base="none", scope="tensor", min_models=1,
    description="Riemannian (Karcher) mean of the models' directions, scaled by their mean norm",
))

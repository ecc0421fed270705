"""The generalised task-arithmetic family: task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

Per tensor: delta_k = x_k − base, optionally sparsified with density_k;
delta_k *= weight_k; optionally keep only entries agreeing with the majority
sign; sum; optionally divide by the summed weights; scale by lambda; add base.
Sparsification needs the whole delta tensor (thresholds, L1 rescale), so those
members run at tensor scope; plain task arithmetic streams row blocks.
Random masks come from ``ctx.generator`` so results never depend on order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergepipe.errors import SpecError
from mergepipe.methods.base import REQUIRED, MergeMethod, TensorContext, register
from mergepipe.methods.reduce import total

Sparsify = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None


def _rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale kept values so the L1 norm matches the unsparsified delta."""
    before = total(delta.abs())
    after = total(kept.abs())
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def _magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top max(1, int(density·numel)) entries by |delta| over the whole tensor."""
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[order[:k]] = 1
    return mask.reshape_as(delta)


def _magnitude_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the top gamma fraction and the smallest entries so that density remains."""
    if density >= 1:
        return torch.ones_like(delta)
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[n_bot:n_bot + target]] = 1
    return mask.reshape_as(delta)


def _bernoulli(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return torch.ones_like(delta)
    probs = torch.full_like(delta, density)
    return torch.bernoulli(probs, generator=gen)


def _della(delta: torch.Tensor, density: float, epsilon: float,
           gen: torch.Generator) -> torch.Tensor:
    """Per-row keep probability ramped by magnitude rank in [density−ε, density+ε]."""
    if density >= 1:
        return torch.ones_like(delta)
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError("epsilon must keep density ± epsilon inside (0, 1)")
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(delta.dtype) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return torch.bernoulli(probs, generator=gen).reshape(delta.shape)


@dataclass(frozen=True)
class TaskArithmeticFamily:
    sparsify: Sparsify
    consensus: bool

    def __call__(self, ctx: TensorContext, base: torch.Tensor | None,
                 tensors: list[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
        assert base is not None
        if not tensors:
            return base.clone()
        weights = [float(w) for w in params["weight"]]
        deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
        for k, x in enumerate(tensors):  # one input's temporaries at a time
            delta = torch.sub(x, base, out=deltas[k])
            if self.sparsify is not None:
                kept = delta * self._mask(ctx, k, delta, params)
                if params["rescale"]:
                    kept = _rescale_l1(delta, kept)
                deltas[k] = kept
        w = torch.tensor(weights, dtype=base.dtype, device=base.device)
        w = w.reshape(-1, *([1] * base.dim()))
        deltas.mul_(w)
        if self.consensus:
            majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
            mask = deltas.sign() == majority
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed = deltas.mul_(mask).sum(dim=0)  # in place: deltas are not needed again
        else:
            mixed = deltas.sum(dim=0)
            total_w = float(w.sum())
            divisor = torch.tensor(total_w if abs(total_w) >= 1e-8 else 1.0, dtype=base.dtype,
                                   device=base.device)
        if params["normalize"]:
            mixed = mixed / divisor
        lam = float(params["lambda"])
        if lam != 1:
            mixed = mixed * lam
        return base + mixed

    def _mask(self, ctx: TensorContext, k: int, delta: torch.Tensor,
              params: dict[str, Any]) -> torch.Tensor:
        density = float(params["density"][k])
        if self.sparsify == "magnitude":
            return _magnitude(delta, density)
        if self.sparsify == "magnitude_outliers":
            return _magnitude_outliers(delta, density, float(params["gamma"][k]))
        gen = ctx.generator(k, delta.device)
        if self.sparsify == "random":
            return _bernoulli(delta, density, gen)
        return _della(delta, density, float(params["epsilon"][k]), gen)


def _check_epsilon(params: dict[str, Any], keys: list[str]) -> None:
    """DELLA's keep probabilities density ± epsilon must be probabilities."""
    for key, d, e in zip(keys, params["density"], params["epsilon"]):
        if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
            raise SpecError(f"model {key!r}: density {d:g} ± epsilon {e:g} must stay inside "
                            f"(0, 1)")


def _family(name: str, sparsify: Sparsify, consensus: bool, normalize: bool, rescale: bool,
            description: str) -> MergeMethod:
    model_params: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if sparsify == "magnitude_outliers":
        model_params["gamma"] = 0.01
    if sparsify == "della_magprune":
        model_params["epsilon"] = 0.15
    linear_in_delta = sparsify is None and not consensus
    return register(MergeMethod(
        name=name, fn=TaskArithmeticFamily(sparsify, consensus),
        model_params=model_params,
        global_params={"normalize": normalize, "rescale": rescale, "lambda": 1.0,
                       "int8_mask": False},
        base="required",
        scope="block" if sparsify is None and not consensus else "tensor",
        stochastic=sparsify in ("random", "della_magprune"),
        bound_kind="exact" if linear_in_delta else "estimate",
        zero_weight_skips=True,
        description=description,
        validate=_check_epsilon if sparsify == "della_magprune" else None,
    ))


_family("task_arithmetic", None, False, False, False, "base + sum of weighted task vectors")
_family("ties", "magnitude", True, True, False, "magnitude-pruned task vectors with sign consensus")
_family("dare_ties", "random", True, False, True, "random-dropped task vectors with sign consensus")
_family("dare_linear", "random", False, False, True, "random-dropped task vectors, summed")
_family("breadcrumbs", "magnitude_outliers", False, False, False,
        "task vectors without outliers and small entries")
_family("breadcrumbs_ties", "magnitude_outliers", True, False, False,
        "breadcrumbs with sign consensus")
_family("della", "della_magprune", True, True, True, "rank-ramped random pruning with consensus")
_family("della_linear", "della_magprune", False, False, True, "rank-ramped random pruning, summed")

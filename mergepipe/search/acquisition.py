"""qLogNEHVI with in-flight candidates as pending points, and pool generation.

Passing the candidates still being evaluated as ``X_pending`` makes the
acquisition integrate over their unknown outcomes, so a free worker is sent
somewhere that adds hypervolume beyond what the busy workers will bring.
"""
from __future__ import annotations

import warnings

import torch
from botorch.acquisition.multi_objective.logei import \
    qLogNoisyExpectedHypervolumeImprovement
from botorch.models.model import Model
from botorch.optim import optimize_acqf
from botorch.sampling import SobolQMCNormalSampler

from mergepipe.search.objectives import REF_POINT

MC_SAMPLES = 64


def build_acquisition(model: Model, X_baseline: torch.Tensor,
                      X_pending: torch.Tensor | None = None,
                      ref_point: tuple[float, float] = REF_POINT,
                      seed: int = 0) -> qLogNoisyExpectedHypervolumeImprovement:
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([MC_SAMPLES]), seed=seed)
    acq = qLogNoisyExpectedHypervolumeImprovement(
        model=model, ref_point=list(ref_point), X_baseline=X_baseline.to(torch.double),
        sampler=sampler, prune_baseline=True, cache_pending=True)
    if X_pending is not None and X_pending.shape[0] > 0:
        acq.set_X_pending(X_pending.to(torch.double))
    return acq


def unit_bounds(dim: int) -> torch.Tensor:
    return torch.stack([torch.zeros(dim), torch.ones(dim)]).to(torch.double)


def optimise_pool(acq: qLogNoisyExpectedHypervolumeImprovement, dim: int, pool: int,
                  raw_samples: int = 128, maxiter: int = 60) -> torch.Tensor:
    """``pool`` local optima of the single-point acquisition, one per restart.

    Independent restarts give a spread of good candidates for the reranker to
    choose among, at the cost of one q=1 optimisation instead of a q=pool one.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X, _ = optimize_acqf(acq, bounds=unit_bounds(dim), q=1, num_restarts=pool,
                             raw_samples=max(raw_samples, 2 * pool), return_best_only=False,
                             options={"maxiter": maxiter, "batch_limit": 8})
    return X.reshape(-1, dim).detach()


def optimise_batch(acq: qLogNoisyExpectedHypervolumeImprovement, dim: int, q: int,
                   num_restarts: int = 8, raw_samples: int = 128,
                   maxiter: int = 60) -> torch.Tensor:
    """A joint batch of ``q`` points, greedily one after another (synchronous BO)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X, _ = optimize_acqf(acq, bounds=unit_bounds(dim), q=q, num_restarts=num_restarts,
                             raw_samples=raw_samples, sequential=True,
                             options={"maxiter": maxiter, "batch_limit": 8})
    return X.reshape(-1, dim).detach()


def score_each(acq: qLogNoisyExpectedHypervolumeImprovement, X: torch.Tensor) -> torch.Tensor:
    """The acquisition value of each candidate on its own (q = 1)."""
    with torch.no_grad():
        return acq(X.to(torch.double).unsqueeze(1)).reshape(-1)

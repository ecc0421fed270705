"""One GP per objective, Matern-5/2 with ARD, lengthscales seeded from the layer prior.

Re-seeding the lengthscales before every fit keeps the optimiser of the
marginal likelihood starting from the prior's guess instead of from wherever
the previous fit drifted, which matters with few points in many dimensions.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from gpytorch.kernels import MaternKernel, ScaleKernel
from gpytorch.mlls import SumMarginalLogLikelihood

DEFAULT_LENGTHSCALE = 1.0


def _kernel(dim: int, lengthscales: Sequence[float] | None) -> ScaleKernel:
    kernel = ScaleKernel(MaternKernel(nu=2.5, ard_num_dims=dim))
    ls = list(lengthscales) if lengthscales is not None else [DEFAULT_LENGTHSCALE] * dim
    if len(ls) != dim:
        raise ValueError(f"{len(ls)} lengthscales for a {dim}-dimensional space")
    kernel.base_kernel.lengthscale = torch.tensor(ls, dtype=torch.double).reshape(1, dim)
    return kernel


def fit_surrogate(X: torch.Tensor, Y: torch.Tensor,
                  lengthscales: Sequence[float] | None = None) -> ModelListGP:
    """Fit independent GPs to each column of ``Y`` on ``X`` ∈ [0, 1]^d (double precision)."""
    X = X.to(torch.double)
    Y = Y.to(torch.double)
    dim = X.shape[-1]
    bounds = torch.stack([torch.zeros(dim), torch.ones(dim)]).to(torch.double)
    gps = []
    for j in range(Y.shape[-1]):
        gp = SingleTaskGP(X, Y[:, j:j + 1], covar_module=_kernel(dim, lengthscales),
                          input_transform=Normalize(dim, bounds=bounds),
                          outcome_transform=Standardize(1))
        gps.append(gp)
    model = ModelListGP(*gps)
    mll = SumMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fit retries and reports its own failures
        try:
            fit_gpytorch_mll(mll)
        except Exception:  # a failed fit keeps the prior lengthscales: still a usable model
            pass
    model.eval()
    return model

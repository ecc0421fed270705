"""The search algorithms, all behind one small interface so one loop runs them all.

Every algorithm either has a fixed point for a trial index (the shared Sobol
initial design, the Sobol baseline, the model-level grids) or proposes from
the history. Fixed points are a pure function of (seed, trial index), so a
resumed search reproduces exactly the points it had not finished.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from botorch.acquisition import AcquisitionFunction
from botorch.models.model import Model

from mergepipe.search.acquisition import (build_acquisition, optimise_batch, optimise_pool,
                                          score_each)
from mergepipe.search.config import ALGORITHMS  # the names live with the config (light)
from mergepipe.search.objectives import REF_POINT, pareto_mask
from mergepipe.search.rerank import DUPLICATE_TOL, rerank, rms_distance, unseen
from mergepipe.search.space import LayerSpace, model_level_spec
from mergepipe.search.surrogate import DEFAULT_LENGTHSCALE, fit_surrogate

TIES_DENSITY = 0.5
ANCHOR_POINTS = ((0.0, 1.0), (1.0, 0.0))  # base and reasoning, by construction
DIAGONAL_POINTS = 19    # model-level merges added to AP-BMM's candidate pool
PERTURBATIONS = 4       # moves around each Pareto point added to the pool
PERTURB_SCALE = 0.08
BRIDGE_STEPS = (0.25, 0.5, 0.75)  # where along a front gap bridging candidates sit
EDGE_STEPS = 10         # steps along each edge: EDGE_STEPS + 1 points, its ends included
STRADDLES = 2           # places in each AP-BMM batch for halving a pair across a front gap


@dataclass
class History:
    """What the optimiser may condition on: finished points and those in flight."""

    X: torch.Tensor                  # (n, d) finished decision vectors
    Y: torch.Tensor                  # (n, 2) their objectives (failures at the reference point)
    pending: torch.Tensor            # (m, d) candidates being evaluated now

    @classmethod
    def empty(cls, dim: int) -> "History":
        z = torch.zeros(0, dim, dtype=torch.double)
        return cls(z, torch.zeros(0, 2, dtype=torch.double), z.clone())


def sobol_design(dim: int, n: int, seed: int) -> torch.Tensor:
    """The scrambled Sobol points every algorithm with this seed starts from."""
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    return engine.draw(n).to(torch.double)


@dataclass
class Algorithm:
    """Base: a layer-wise space whose points all come from the Sobol sequence."""

    space: LayerSpace
    n_init: int
    n_total: int
    seed: int
    synchronous: bool = False
    lengthscales: Sequence[float] | None = None
    name: str = "sobol"
    _design: torch.Tensor | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return self.space.dim

    def design(self) -> torch.Tensor:
        if self._design is None:
            self._design = sobol_design(self.dim, max(self.n_total, self.n_init) + 64, self.seed)
        return self._design

    def fixed_point(self, trial: int) -> list[float] | None:
        """The predetermined point of trial ``trial``, or None when it must be proposed."""
        return self.design()[trial].tolist() if trial < self.n_init else None

    def propose(self, history: History, n: int) -> list[list[float]]:
        raise NotImplementedError

    def spec(self, x: Sequence[float], base: str, reasoning: str) -> dict[str, Any]:
        return self.space.to_spec(x, base, reasoning)

    def immediate(self, history: History) -> list[list[float]]:
        """Points worth running now that need no surrogate, best first (none here).

        The coordinator asks for them when its ready batch was chosen on an
        out-of-date history, at the moment a worker frees up, so they must take
        milliseconds, not a refit.
        """
        return []

    def fill(self, chosen: list[list[float]], history: History, n: int) -> list[list[float]]:
        """Top up with Sobol points away from everything pending (rarely needed)."""
        extra = sobol_design(self.dim, 256, self.seed + 7919 + history.X.shape[0])
        taken = history.pending.tolist() + [list(x) for x in chosen]
        return chosen + unseen(extra, taken)[:max(n - len(chosen), 0)]


class SobolSearch(Algorithm):
    """Quasi-random baseline: the shared design continued to the whole budget."""

    def fixed_point(self, trial: int) -> list[float] | None:
        return self.design()[trial].tolist()


class GridSearch(Algorithm):
    """Model-level baseline: one global weight on an even grid strictly inside (0, 1).

    The end points are the two sources themselves, already evaluated as the
    anchors; spending budget on them again would flatter the grid.
    """

    method: str = "task_arithmetic"

    @property
    def dim(self) -> int:
        return 1

    def fixed_point(self, trial: int) -> list[float] | None:
        return [(min(trial, self.n_total - 1) + 1) / (self.n_total + 1)]

    def spec(self, x: Sequence[float], base: str, reasoning: str) -> dict[str, Any]:
        density = TIES_DENSITY if self.method == "ties" else None
        return model_level_spec(self.method, float(x[0]), base, reasoning, density=density)


class TiesGrid(GridSearch):
    method = "ties"


def with_sources(history: "History") -> tuple[torch.Tensor, torch.Tensor]:
    """The finished trials plus the two sources at the corners of the space.

    x = 0 is the base and x = 1 the reasoning model; their objectives are known
    by construction of the normalisation, so they cost no evaluation.
    """
    dim = history.X.shape[-1]
    corners = torch.stack([torch.zeros(dim), torch.ones(dim)]).to(torch.double)
    return (torch.cat([history.X, corners]),
            torch.cat([history.Y, torch.tensor(ANCHOR_POINTS, dtype=torch.double)]))


def front_by_accuracy(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Pareto points (decisions, objectives), least accurate first: the order in
    which a front's gaps are read."""
    mask = pareto_mask(Y)
    order = torch.argsort(Y[mask][:, 0])
    return X[mask][order], Y[mask][order]


def _torch_seed(seed: int, n_obs: int) -> int:
    return (seed * 100_003 + n_obs) % (2 ** 31)


class SyncQNEHVI(Algorithm):
    """Synchronous batch qLogNEHVI: the whole batch is chosen together and awaited."""

    def propose(self, history: History, n: int) -> list[list[float]]:
        torch.manual_seed(_torch_seed(self.seed, history.X.shape[0]))
        model = fit_surrogate(history.X, history.Y, None)
        acq = build_acquisition(model, history.X, history.pending, seed=self.seed)
        X = optimise_batch(acq, self.dim, n)
        return self.fill([x.tolist() for x in X][:n], history, n) if X.shape[0] < n else \
            [x.tolist() for x in X]


class APBMM(Algorithm):
    """Asynchronous prior-guided BO: pending-aware acquisition, the gap-aware rerank,
    and a place or two in each batch for closing in on a gap's ramp (:meth:`straddles`)."""

    pool_factor: int = 3

    def propose(self, history: History, n: int) -> list[list[float]]:
        torch.manual_seed(_torch_seed(self.seed, history.X.shape[0]))
        X, Y = with_sources(history)
        model, acq = self._fit(X, Y, history.pending)
        pool = torch.cat([optimise_pool(acq, self.dim, self.pool_factor * n),
                          self.seeds(history)])
        scores = score_each(acq, pool)
        with torch.no_grad():
            means = model.posterior(pool).mean.reshape(-1, 2)
        picks = rerank(pool, scores, means, Y[pareto_mask(Y)], history.pending, n, evaluated=X)
        chosen = [pool[i].tolist() for i in picks]
        if n > 1 and len(chosen) == n:   # the batch's last places go to the largest gaps
            keep = n - min(STRADDLES, n - 1)
            mids = unseen(self.straddles(X, Y),
                          history.pending.tolist() + X.tolist() + chosen[:keep])
            chosen = (chosen[:keep] + mids[:n - keep] + chosen[keep:])[:n]
        return self.fill(chosen, history, n)

    def immediate(self, history: History) -> list[list[float]]:
        """The straddles of the newest front (:meth:`straddles`): bisecting a gap's
        closest bracketing pair needs only the results, so it can use every one
        that came in while the last batch was being computed."""
        return self.straddles(*with_sources(history))

    def acquisition(self, history: History) -> tuple[Model, AcquisitionFunction]:
        """The surrogate and the acquisition, both knowing the two sources.

        The sources sit at the corners of the space with known objectives and
        are on every front a user is offered, so they are data for the surrogate
        and part of the front an improvement is measured against: a merge
        predicted to score like the base or the reasoning model gains nothing,
        and the budget goes to merges that can join the front the user gets.
        """
        return self._fit(*with_sources(history), history.pending)

    def _fit(self, X: torch.Tensor, Y: torch.Tensor,
             pending: torch.Tensor) -> tuple[Model, AcquisitionFunction]:
        model = fit_surrogate(X, Y, self.lengthscales)
        return model, build_acquisition(model, X, pending, seed=self.seed)

    def seeds(self, history: History) -> torch.Tensor:
        """Candidates the gradient search may miss, scored by the same acquisition.

        The model-level merges (every coefficient equal) are a line through the
        layer-wise space that often carries the sources' trade-off, small moves
        around the current Pareto set refine what already works, and bridges
        across the front's large gaps aim at where it is thinnest; adding them to
        the pool lets the rerank weigh them against the acquisition's optima.
        """
        g = torch.Generator().manual_seed(_torch_seed(self.seed, history.X.shape[0]) + 1)
        diagonal = torch.linspace(0.05, 0.95, DIAGONAL_POINTS, dtype=torch.double)
        cands = [diagonal[:, None].expand(-1, self.dim), self.edges()]
        if history.X.shape[0]:
            front = history.X[pareto_mask(history.Y)]
            for _ in range(PERTURBATIONS):
                step = torch.randn(front.shape, generator=g, dtype=torch.double) * PERTURB_SCALE
                cands.append((front + step).clamp(0, 1))
            if BRIDGE_STEPS:
                cands.append(self.bridges(history))
        return torch.cat(cands)

    def edges(self) -> torch.Tensor:
        """Merges that take whole layer groups from one source, and one group part-way.

        These lie on the edges of the box, where a gradient search arrives only
        when the acquisition slopes there, yet swapping layer groups wholesale is
        often what trades accuracy for length best: on the tiny world much of the
        front lies on the path that hands the groups to the reasoning model one by
        one in the prior's order of importance. The pool gets the single-group
        swaps both ways and the paths that hand groups over (or back) in the
        prior's order, shortest lengthscale first, in every space. Edges off these
        paths stay out even of a small box: the acquisition favours edges (its
        uncertainty is largest there), and those mostly land on merges that
        behave like one already measured.
        """
        d = self.dim
        order = sorted(range(d), key=lambda i: (self.lengthscales[i] if self.lengthscales
                                                 else DEFAULT_LENGTHSCALE, i))
        path = torch.zeros(d + 1, d, dtype=torch.double)
        for k in range(1, d + 1):
            path[k, order[:k]] = 1.0
        eye = torch.eye(d, dtype=torch.double)
        zero, one = torch.zeros(d, dtype=torch.double), torch.ones(d, dtype=torch.double)
        ends = [(path[k], path[k + 1]) for k in range(d)] + \
               [(1 - path[k + 1], 1 - path[k]) for k in range(d)] + \
               [(zero, e) for e in eye] + [(one - e, one) for e in eye]
        t = torch.linspace(0.0, 1.0, EDGE_STEPS + 1, dtype=torch.double)[:, None]
        points = torch.cat([a + t * (b - a) for a, b in ends])
        points = torch.unique(points, dim=0)
        sources = (points.sum(-1) == 0) | (points.sum(-1) == d)
        return points[~sources]

    def bridges(self, history: History) -> torch.Tensor:
        """Points on the segments between neighbours of the front that border a large gap.

        Merges change smoothly enough along a line in coefficient space that the
        midway merge of two Pareto models often lands between them in objective
        space, which is where the front needs points; the sources close the front
        at both ends.
        """
        Xf, Yf = front_by_accuracy(*with_sources(history))
        if Xf.shape[0] < 2:
            return torch.zeros(0, self.dim, dtype=torch.double)
        lengths = (Yf[1:] - Yf[:-1]).norm(dim=-1)
        out = []
        for i in torch.nonzero(lengths >= lengths.median()).reshape(-1).tolist():
            for t in BRIDGE_STEPS:
                out.append(Xf[i] + t * (Xf[i + 1] - Xf[i]))
        return torch.stack(out) if out else torch.zeros(0, self.dim, dtype=torch.double)

    def straddles(self, X: torch.Tensor, Y: torch.Tensor) -> list[list[float]]:
        """Per gap of the front, largest empty rectangle first: the midpoint of the
        closest pair of merges, one no more accurate than the gap's left end and one
        at least as accurate as its right end.

        The front's missing pieces often sit on a narrow ramp between a plateau of
        merges that answer like one source and a plateau further on (on the tiny
        world, past a zone near the base where merges answer exactly like it). A
        smooth surrogate calls such steps noise and keeps sampling the plateaus; the
        closest pair that straddles a gap brackets its ramp, and halving the pair
        closes in on it whatever the surrogate believes. Pairs already as close as
        the duplicate tolerance are a cliff, not a ramp, and are skipped.
        """
        ok = (Y != torch.tensor(REF_POINT, dtype=torch.double)).any(-1)   # failures
        X, Y = X[ok], Y[ok]
        _, front = front_by_accuracy(X, Y)
        if front.shape[0] < 2:
            return []
        area = (front[1:, 0] - front[:-1, 0]) * (front[:-1, 1] - front[1:, 1])
        out = []
        for g in torch.argsort(area, descending=True).tolist():
            below, above = X[Y[:, 0] <= front[g, 0]], X[Y[:, 0] >= front[g + 1, 0]]
            if not below.shape[0] or not above.shape[0]:
                continue
            d = rms_distance(below, above)
            i, j = divmod(int(torch.argmin(d)), above.shape[0])
            if float(d[i, j]) > 2 * DUPLICATE_TOL:
                out.append(((below[i] + above[j]) / 2).tolist())
        return out


_FACTORIES: dict[str, Callable[..., Algorithm]] = {
    "apbmm": lambda **kw: APBMM(name="apbmm", **kw),
    "sync-qnehvi": lambda **kw: SyncQNEHVI(name="sync-qnehvi", synchronous=True,
                                           **{**kw, "lengthscales": None}),
    "sobol": lambda **kw: SobolSearch(name="sobol", **kw),
    "grid-ta": lambda **kw: GridSearch(name="grid-ta", **kw),
    "grid-ties": lambda **kw: TiesGrid(name="grid-ties", **kw),
}


def make_algorithm(name: str, space: LayerSpace, n_init: int, n_total: int, seed: int,
                   lengthscales: Sequence[float] | None = None) -> Algorithm:
    if name not in _FACTORIES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return _FACTORIES[name](space=space, n_init=n_init, n_total=n_total, seed=seed,
                            lengthscales=lengthscales)

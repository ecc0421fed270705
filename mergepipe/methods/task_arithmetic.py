"""The generalised task-arithmetic family: task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

Per tensor: delta_k = x_k − base, optionally sparsified with density_k;
delta_k *= weight_k; optionally keep only entries agreeing with the majority
sign; sum; optionally divide by the summed weights; scale by lambda; add base.

Sparsification needs whole-tensor facts (a magnitude threshold, an L1 norm),
but never the whole tensor at once: :class:`FamilyStream` gathers them in
statistics passes over row blocks (:mod:`.select` finds thresholds exactly
from histograms; :class:`.reduce.StreamTotal` sums norms in ``total``'s
order), then merges block by block. Memory is a few blocks and histograms per
input, whatever the tensor size. The whole-tensor function is the same stream
over one block, so both give the same bytes.
Random masks come from ``ctx.generator``, one generator per input drawn in flat
order, so results never depend on order, blocks or threads.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from mergepipe.errors import SpecError
from mergepipe.methods.base import (REQUIRED, MergeMethod, TensorContext, each, register,
                                    whole_tensor)
from mergepipe.methods.reduce import StreamTotal
from mergepipe.methods.select import (RankSelect, RankWindow, apply_mask, found_window,
                                      magnitude_bits, window_ranks)

Sparsify = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
EPS = 1e-7


class _Sparsifier:
    """One input's sparsification: ``passes`` statistics passes, then :meth:`keep` per block."""

    passes = 0

    def __init__(self, numel: int, rescale: bool):
        self.rescale = rescale
        self.before = StreamTotal(numel) if rescale else None
        self.after = StreamTotal(numel) if rescale else None
        self.scale: torch.Tensor | None = None

    def observe(self, pass_no: int, delta: torch.Tensor) -> None:
        pass

    def observe_input(self, pass_no: int, x: torch.Tensor, base: torch.Tensor) -> None:
        """One block of this input (its delta is ``x − base``)."""
        self.observe(pass_no, torch.sub(x, base))

    def observe_zeros(self, pass_no: int, like: torch.Tensor) -> None:
        """A block where this input equals the base (its delta is zero)."""
        self.observe(pass_no, torch.zeros_like(like))

    def end_pass(self, pass_no: int) -> None:
        pass

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(delta)

    def _totals(self, delta: torch.Tensor, kept: torch.Tensor) -> None:
        self.before.add(delta.abs())
        self.after.add(kept.abs())

    def _finish_totals(self) -> None:
        """L1 rescale as mergekit: kept · (|delta|₁ / |kept|₁) unless either is tiny."""
        before, after = self.before.result(), self.after.result()
        if not (before < EPS or after < EPS):
            self.scale = before / after

    def keep(self, delta: torch.Tensor) -> torch.Tensor:
        """The sparsified delta (``delta`` itself may be overwritten)."""
        kept = delta * self.mask(delta)
        return kept if self.scale is None else kept * self.scale

    def skip_zeros(self, like: torch.Tensor) -> bool:
        """Account for a zero-delta block without merging it; False if it must be merged
        (random masks draw for every entry, L1 totals sum every entry)."""
        return False

    def kept_by_loop(self, x: torch.Tensor, base: torch.Tensor, weight: float,
                     out: torch.Tensor) -> bool:
        """Write this block's kept delta times ``weight`` into ``out`` with a compiled
        loop (:func:`.kernels.kept_delta`); False where :meth:`keep` must run."""
        return False


class _Dense(_Sparsifier):
    """No sparsification (density 1 too: every mask is ones and any rescale is 1)."""

    def keep(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def kept_by_loop(self, x: torch.Tensor, base: torch.Tensor, weight: float,
                     out: torch.Tensor) -> bool:
        from mergepipe.methods import kernels
        return kernels.kept_delta(x, base, (-1, 0, 0), weight, out) is not None

    def skip_zeros(self, like: torch.Tensor) -> bool:
        return True


class _Ranked(_Sparsifier):
    """Keep a window of stable magnitude ranks (TIES' top k, breadcrumbs' middle band)."""

    def __init__(self, numel: int, rescale: bool, r0: int, r1: int, descending: bool):
        super().__init__(numel, rescale)
        self.numel, self.r0, self.r1, self.descending = numel, r0, r1, descending
        self.empty = r1 <= r0
        self.ranks = window_ranks(numel, r0, r1, descending)
        self.select = RankSelect([r for r in self.ranks if r is not None])
        self.window: RankWindow | None = None
        self.passes = 0 if self.empty else 2 + rescale

    def observe(self, pass_no: int, delta: torch.Tensor) -> None:
        if pass_no < 2:
            self.select.observe(pass_no, magnitude_bits(delta))
        else:
            self._totals(delta, self.keep_unscaled(delta.clone()))

    def observe_input(self, pass_no: int, x: torch.Tensor, base: torch.Tensor) -> None:
        if pass_no < 2:   # the selection's loops take |x − base| without a delta tensor
            self.select.observe(pass_no, x, base)
        else:
            super().observe_input(pass_no, x, base)

    def observe_zeros(self, pass_no: int, like: torch.Tensor) -> None:
        if pass_no < 2:
            self.select.observe_zeros(pass_no, like.numel())
        else:
            super().observe_zeros(pass_no, like)

    def end_pass(self, pass_no: int) -> None:
        if pass_no < 2:
            self.select.end_pass(pass_no)
        else:
            self._finish_totals()
        if pass_no == 1:
            self.window = found_window(self.select, self.ranks, self.r0, self.r1, self.numel,
                                       self.descending)
        elif pass_no > 1:
            self.window.rewind()   # the window counts ties as it goes: again for the merge

    def kept_by_loop(self, x: torch.Tensor, base: torch.Tensor, weight: float,
                     out: torch.Tensor) -> bool:
        if self.empty or self.scale is not None:
            return False
        cut = self.window.lower_cut()
        if cut is None:
            return False
        from mergepipe.methods import kernels
        ties = kernels.kept_delta(x, base, cut, weight, out)
        if ties is None:
            return False
        self.window.passed(ties)
        return True

    def keep_unscaled(self, delta: torch.Tensor) -> torch.Tensor:
        if self.empty:
            return delta.zero_()
        mask = self.window.keep(magnitude_bits(delta))
        return delta if mask is None else apply_mask(delta, mask)

    def keep(self, delta: torch.Tensor) -> torch.Tensor:
        kept = self.keep_unscaled(delta)
        return kept if self.scale is None else kept.mul_(self.scale)

    def skip_zeros(self, like: torch.Tensor) -> bool:
        if self.window is not None:
            self.window.skip_zeros(like.numel())
        return True


class _Random(_Sparsifier):
    """DARE's Bernoulli(density) mask, or DELLA's rank-ramped one, from a seeded generator.

    With rescale, one pass draws the masks to learn the L1 norms; the merge
    pass draws them again from a fresh generator of the same seed.
    """

    def __init__(self, numel: int, rescale: bool,
                 new_gen: Callable[[torch.device], torch.Generator],
                 density: float, epsilon: float | None):
        super().__init__(numel, rescale)
        self.new_gen, self.density, self.epsilon = new_gen, density, epsilon
        self.gen: torch.Generator | None = None
        self.passes = int(rescale)

    def observe(self, pass_no: int, delta: torch.Tensor) -> None:
        self._totals(delta, delta * self.mask(delta))

    def end_pass(self, pass_no: int) -> None:
        self._finish_totals()
        self.gen = None

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        if self.gen is None:
            self.gen = self.new_gen(delta.device)
        if self.epsilon is None:
            return _bernoulli(delta, self.density, self.gen)
        return _della(delta, self.density, self.epsilon, self.gen)


def _bernoulli(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Draws one number per entry in flat order, so row blocks in turn draw as the whole."""
    probs = torch.full_like(delta, density)
    return torch.bernoulli(probs, generator=gen)


def _della(delta: torch.Tensor, density: float, epsilon: float,
           gen: torch.Generator) -> torch.Tensor:
    """Per-row keep probability ramped by magnitude rank in [density−ε, density+ε].

    Ranks are within a row (the last dimensions), so a block of whole rows
    needs nothing from the others.
    """
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


class FamilyStream:
    """One tensor's merge as statistics passes over row blocks, then a merge pass.

    The engine feeds :meth:`observe` every row block in order for each of
    ``passes`` passes (inputs not :meth:`wanted` in a pass may be None), calls
    :meth:`end_pass` after each, then :meth:`merge` on every block in order.
    """

    def __init__(self, family: "TaskArithmeticFamily", ctx: TensorContext,
                 params: dict[str, Any], n_inputs: int):
        self.family, self.params = family, params
        numel = math.prod(ctx.shape)
        self.inputs = [family.sparsifier(ctx, k, numel, params) for k in range(n_inputs)]
        self.passes = max((s.passes for s in self.inputs), default=0)

    def wanted(self, pass_no: int) -> list[bool]:
        return [pass_no < s.passes for s in self.inputs]

    def observe(self, pass_no: int, base: torch.Tensor, tensors: list[torch.Tensor | None]) -> None:
        """One row block of a statistics pass; an input that *is* ``base`` has a zero delta."""
        def one(job: tuple[_Sparsifier, torch.Tensor]) -> None:
            s, x = job
            if x is base:
                s.observe_zeros(pass_no, base)
            else:
                s.observe_input(pass_no, x, base)
        each(one, [(s, x) for s, x in zip(self.inputs, tensors) if pass_no < s.passes])

    def end_pass(self, pass_no: int) -> None:
        for s in self.inputs:
            if pass_no < s.passes:
                s.end_pass(pass_no)

    def merge(self, base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One row block of the merge, as mergekit's whole-tensor arithmetic.

        Inputs that are ``base`` itself (unselected under a budget) add a zero
        delta: left out of the sums, which zeros do not change.
        """
        from mergepipe.methods import kernels   # numba loads with the first merge, not per command
        params = self.params
        weights = [float(w) for w in params["weight"]]
        # an input that is the base tells its sparsifier the block went by (the tie
        # counts advance) and drops out, unless its masks must draw for it anyway
        live = [k for k, x in enumerate(tensors)
                if x is not base or not self.inputs[k].skip_zeros(base)]
        if not live:
            return base.clone()
        normalize, lam = bool(params["normalize"]), float(params["lambda"])
        shape = base.shape
        merged = torch.empty(base.numel(), dtype=base.dtype, device=base.device)
        done = 0
        if self.family.sparsify is None and not self.family.consensus and not normalize:
            # plain task arithmetic: one compiled pass per step, no delta in memory; the
            # torch code below takes the last columns, which torch sums in another order
            inputs, live_w, n = [tensors[k].reshape(-1) for k in live], \
                [weights[k] for k in live], base.numel()
            done = sum(each(lambda a: kernels.weighted_sum_merge(
                inputs, live_w, base.reshape(-1), slice(a, min(a + STEP_COLUMNS, n)), lam,
                merged), range(0, n, STEP_COLUMNS)))
            if done == base.numel():
                return merged.reshape(shape)
        if done:   # the flat columns still to merge (DELLA's rows never get here)
            base, tensors = base.reshape(-1)[done:], [x.reshape(-1)[done:] for x in tensors]
        deltas = torch.empty((len(live), *base.shape), dtype=base.dtype, device=base.device)

        def one(j: int) -> None:   # one input's temporaries per thread at a time
            k = live[j]
            if self.inputs[k].kept_by_loop(tensors[k], base, weights[k], deltas[j]):
                return
            delta = torch.sub(tensors[k], base, out=deltas[j])
            if self.family.sparsify is not None:
                kept = self.inputs[k].keep(delta)
                if kept is not delta:
                    delta.copy_(kept)
            delta.mul_(weights[k])
        each(one, range(len(live)))
        w = torch.tensor([weights[k] for k in live], dtype=base.dtype,
                         device=base.device).reshape(-1, 1)
        flat, base_flat, tail = deltas.reshape(len(live), -1), base.reshape(-1), merged[done:]
        # every input's weight (float32, as mergekit sums them), skipped ones too
        total_w = float(torch.tensor(weights, dtype=base.dtype).sum())
        total_w = total_w if abs(total_w) >= 1e-8 else 1.0

        def step(a: int) -> None:   # the columns [a, a + STEP_COLUMNS), alone
            cols = slice(a, min(a + STEP_COLUMNS, base_flat.numel()))
            if self.family.consensus:   # compiled for the leading columns, torch for the rest
                ready = kernels.consensus_merge(flat, w, base_flat, cols, normalize, lam, tail)
                cols = slice(cols.start + ready, cols.stop)
                if cols.start == cols.stop:
                    return
                mixed, divisor = _consensus(flat[:, cols], w, normalize)
            else:
                mixed, divisor = flat[:, cols].sum(dim=0), total_w
            if normalize:
                mixed /= divisor
            if lam != 1:
                mixed *= lam
            torch.add(base_flat[cols], mixed, out=tail[cols])
        each(step, range(0, base_flat.numel(), STEP_COLUMNS))
        return merged.reshape(shape)


# columns of the [inputs, n] deltas merged per step: they stay in the CPU cache, and
# the steps of a block spread over the cores (each column is computed alone, so the
# bits do not depend on the step)
STEP_COLUMNS = 1 << 16


def _consensus(d: torch.Tensor, w: torch.Tensor,
               normalize: bool) -> tuple[torch.Tensor, torch.Tensor | float]:
    """TIES' sign election over weighted deltas [inputs, columns], as mergekit computes it:
    the sum of the entries agreeing with the majority sign and (to normalise by) the
    sum of their weights, 1 where none agrees."""
    # +1 where the sum is >= 0, else -1 (a sum of -0.0 has only zero terms, which
    # agree with neither sign)
    majority = torch.ones(d.shape[1], dtype=d.dtype, device=d.device).copysign_(d.sum(dim=0))
    # 1 where an entry's sign is the majority's, else 0 (zeros never agree)
    agree = d.sign().mul_(majority).clamp_min_(0)
    divisor: torch.Tensor | float = 1.0
    if normalize:
        divisor = (w * agree).sum(dim=0)
        if bool((w > 0).all()):   # sums of positive weights: 0 only where none agrees
            divisor.clamp_min_(float(w.min()))   # (and the sum is 0 there: 0 either way)
        else:
            divisor[divisor == 0] = 1
    return agree.mul_(d).sum(dim=0), divisor


@dataclass(frozen=True)
class TaskArithmeticFamily:
    sparsify: Sparsify
    consensus: bool

    def __call__(self, ctx: TensorContext, base: torch.Tensor | None,
                 tensors: list[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
        """The whole tensor as one block of the stream."""
        assert base is not None
        return whole_tensor(self.stream(dataclasses.replace(ctx, shape=tuple(base.shape)),
                                        params, len(tensors)), base, tensors)

    def stream(self, ctx: TensorContext, params: dict[str, Any], n_inputs: int) -> FamilyStream:
        return FamilyStream(self, ctx, params, n_inputs)

    def sparsifier(self, ctx: TensorContext, k: int, numel: int,
                   params: dict[str, Any]) -> _Sparsifier:
        rescale = bool(params["rescale"])
        density = float(params["density"][k]) if "density" in params else 1.0
        if self.sparsify is None or density >= 1:
            return _Dense(numel, False)
        if self.sparsify == "magnitude":
            if density <= 0 or numel == 0:
                return _Ranked(numel, rescale, 0, 0, True)
            return _Ranked(numel, rescale, 0, max(1, int(density * numel)), True)
        if self.sparsify == "magnitude_outliers":
            target = int(density * numel)
            n_top = int(float(params["gamma"][k]) * numel)
            n_bot = max(0, numel - target - n_top)
            return _Ranked(numel, rescale, n_bot, n_bot + target, False)

        def new_gen(device: torch.device) -> torch.Generator:
            return ctx.generator(k, device)
        eps = float(params["epsilon"][k]) if self.sparsify == "della_magprune" else None
        return _Random(numel, rescale, new_gen, density, eps)


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
    fn = TaskArithmeticFamily(sparsify, consensus)
    return register(MergeMethod(
        name=name, fn=fn, stream=fn.stream if sparsify is not None or consensus else None,
        model_params=model_params,
        global_params={"normalize": normalize, "rescale": rescale, "lambda": 1.0,
                       "int8_mask": False},
        base="required",
        scope="block" if sparsify is None and not consensus else "tensor",
        stochastic=sparsify in ("random", "della_magprune"),
        native_inputs=True,
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

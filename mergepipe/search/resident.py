"""Resident evaluators: one engine per worker, candidates merged in memory and swapped in.

Writing each candidate as a checkpoint and loading it into a fresh model costs
a full write, a full read and an engine start per trial. A resident worker
loads the base model once and, per candidate, runs the plan through the same
per-tensor merge code as `apply` (:func:`mergepipe.engine.memory.merge_in_memory`)
into memory instead of a shard file, then copies the tensors into the live
model's parameters. The bytes are those `apply` would write (same method, same
output dtype), so `search pareto --materialize` reproduces exactly the model
that was evaluated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergepipe.engine.memory import merge_in_memory
from mergepipe.errors import MergePipeError
from mergepipe.planner.plan import Plan


def swap_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> int:
    """Copy ``tensors`` into the live model's parameters and buffers by name, in place.

    Every parameter must be covered (a tied head shares the embedding's storage,
    so it is covered by it); returns the number of tensors copied.
    """
    state = model.state_dict(keep_vars=True)
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise MergePipeError(f"merged tensor {unknown[0]} has no counterpart in the live model")
    covered = {state[n].data_ptr() for n in tensors}
    missing = [n for n, p in model.named_parameters() if n not in tensors
               and p.data_ptr() not in covered]
    if missing:
        raise MergePipeError(f"the merge does not produce {missing[0]}; cannot swap it in")
    with torch.no_grad():
        for name, t in tensors.items():
            target = state[name]
            if tuple(target.shape) != tuple(t.shape):
                raise MergePipeError(f"merged tensor {name} has shape {tuple(t.shape)}, the live "
                                     f"model {tuple(target.shape)}")
            target.copy_(t)
    return len(tensors)


_ENGINES: dict[tuple[str, str, str], Any] = {}
_LAST_MERGE: dict[str, dict[str, torch.Tensor]] = {}   # this process's last in-memory merge


def resident_engine(backend: str, model_dir: str, device: str) -> Any:
    """This process's engine for (backend, model, device), started on first use."""
    key = (backend, model_dir, device)
    if key not in _ENGINES:
        from mergepipe.evaluate.runner import load_backend
        _ENGINES[key] = load_backend(backend, model_dir, device=device)
    return _ENGINES[key]


def live_module(engine: Any) -> torch.nn.Module:
    model = getattr(engine, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise MergePipeError(f"the {engine.name} backend cannot take weights in place")
    return model


@dataclass
class ResidentJob:
    """Merge a plan in memory, swap it into the worker's live engine and score it.

    A ``helper`` copy (see :mod:`mergepipe.search.sharing`) merges the same plan
    into its own engine and scores the units the owner has not claimed yet.
    """

    plan: Plan
    engine_dir: str              # the checkpoint the engine starts from (the base)
    tasks: list[Any]
    device: str = "cpu"
    backend: str = "transformers"
    stretch: float = 1.0
    slot: int | None = None
    helper: bool = False

    def run(self) -> dict[str, Any]:
        from mergepipe.search.sharing import has_work, nothing_left, score_units
        if self.helper and not has_work(self.slot):
            return nothing_left()
        t0 = time.time()
        engine = resident_engine(self.backend, self.engine_dir, self.device)
        t1 = time.time()
        if hasattr(engine, "load_plan"):   # the engine merges inside its own worker (vLLM)
            engine.load_plan(self.plan)
            merge_s = engine.last_load.get("merge_s", 0.0)
            load_s = engine.last_load.get("load_s", 0.0)
        else:
            # the last candidate's tensors are overwritten (they were copied into the model)
            tensors = merge_in_memory(self.plan, device=self.device,
                                      into=_LAST_MERGE.pop("tensors", None))
            _LAST_MERGE["tensors"] = tensors
            t2 = time.time()
            swap_weights(live_module(engine), tensors)
            merge_s, load_s = t2 - t1, time.time() - t2
        value = score_units(engine, self.tasks, self.slot, self.stretch)
        return {**value, "report": None,
                "overhead": {"engine_start_s": t1 - t0, "merge_s": merge_s, "load_s": load_s}}


@dataclass
class ResidentEvaluateJob:
    """Score a checkpoint (a source model: an anchor) with the worker's live engine.

    The weights are loaded into the engine the trials will use, so a search
    starts one engine per worker, not one more per source model.
    """

    model_dir: str
    engine_dir: str
    tasks: list[Any]
    device: str = "cpu"
    backend: str = "transformers"

    def run(self) -> dict[str, Any]:
        from mergepipe.search.sharing import score_units
        engine = resident_engine(self.backend, self.engine_dir, self.device)
        if hasattr(engine, "load_dir"):
            engine.load_dir(self.model_dir)
        else:
            from safetensors.torch import load_file
            files = sorted(Path(self.model_dir).glob("*.safetensors"))
            swap_weights(live_module(engine), {k: v for f in files for k, v in load_file(f).items()})
        return {**score_units(engine, self.tasks, None), "report": None}

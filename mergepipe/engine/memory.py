"""A plan merged into memory instead of shard files: what resident evaluators swap in.

It runs the same per-tensor merge as `apply` (:func:`mergepipe.engine.execute.merge_task`),
so the tensors are byte-equal to the ones `apply` would write.
"""
from __future__ import annotations

from typing import Any

import torch

from mergepipe.arenas import limit_malloc_arenas
from mergepipe.engine.execute import (DEFAULT_BLOCK_BYTES, READ_AHEAD_BLOCKS, ReadScheduler,
                                      default_threads, merge_task, read_threads)
from mergepipe.engine.reader import BlockReader
from mergepipe.errors import MergePipeError
from mergepipe.planner.plan import Plan
from mergepipe.safetensors_format import torch_dtype


class _MemoryWriter:
    """Takes what the engine would stream into a shard, straight into one tensor per name."""

    def __init__(self, plan: Plan, into: dict[str, torch.Tensor] | None = None) -> None:
        into = into or {}
        self.tensors = {}
        for t in plan.tasks:
            dtype, old = torch_dtype(t.out_dtype), into.get(t.name)
            fits = old is not None and old.dtype == dtype and tuple(old.shape) == tuple(t.shape)
            self.tensors[t.name] = old if fits else torch.empty(t.shape, dtype=dtype)
        self._filled = {name: 0 for name in self.tensors}

    def write(self, name: str, data: Any) -> None:
        flat = self.tensors[name].view(-1).view(torch.uint8)
        start = self._filled[name]
        chunk = torch.frombuffer(data, dtype=torch.uint8) if len(data) else flat[:0]
        flat[start:start + chunk.numel()] = chunk
        self._filled[name] = start + chunk.numel()


def merge_in_memory(plan: Plan, device: str = "cpu", block_bytes: int = DEFAULT_BLOCK_BYTES,
                    into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every output tensor of ``plan``, in its output dtype, byte-equal to `apply`'s.

    ``into``: a previous result to overwrite where names, shapes and dtypes
    match, so that a search evaluator merging candidate after candidate does
    not fault in gigabytes of fresh memory for each (measured at 0.6b:
    17.8 s with fresh tensors, 12.4 s reusing them, bench/results/resident_overhead.md).

    torch runs with `apply`'s thread count for the call (restored after): an
    evaluator's engine may have left it at one thread, or at every core, where
    the per-input threads of the merge would then run one at a time.
    """
    limit_malloc_arenas()
    reader = BlockReader(plan.sources)
    reader.start_read_ahead(READ_AHEAD_BLOCKS * block_bytes, read_threads())
    schedule = ReadScheduler(plan.tasks, plan, reader, block_bytes)
    writer = _MemoryWriter(plan, into)
    previous = torch.get_num_threads()
    torch.set_num_threads(default_threads())
    try:
        for i, task in enumerate(plan.tasks):
            schedule.advance(i)
            merge_task(task, plan, reader, writer, device, block_bytes)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(previous)
        reader.close()
    short = [n for n, t in writer.tensors.items()
             if writer._filled[n] != t.numel() * t.element_size()]
    if short:
        raise MergePipeError(f"the merge produced too few bytes for {short[0]}")
    return writer.tensors

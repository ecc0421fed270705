"""Execute a Plan into a directory: read blocks, merge in float32, stream out.

This module knows nothing about the catalog, so a worker process can run it;
transactions (staging, manifest, commit) are in :mod:`mergepipe.runs`.
Peak memory: for block-scope methods and for tensor-scope methods that
stream (TIES, DARE, breadcrumbs, DELLA, SCE: statistics passes over row blocks,
then a merge pass) a few blocks per input; for the other tensor-scope methods
(SLERP, Model Stock, ...) one float32 copy of the current tensor per input.
Where the time goes is measured per phase (:class:`Phases`).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from mergepipe.arenas import limit_malloc_arenas
from mergepipe.engine.reader import BlockReader
from mergepipe.engine.writer import ShardWriter
from mergepipe.engine.faults import crash_point
from mergepipe.methods.base import TensorContext, drops_base_equal_inputs, get_method
from mergepipe.planner.plan import Plan, Read, TensorTask
from mergepipe.safetensors_format import FLOAT_CODES, dtype_name, itemsize, row_split, torch_dtype

DEFAULT_BLOCK_BYTES = 1 << 20   # float32 bytes per block: the deltas of a K-way block stay in cache


@dataclass
class ExecReport:
    """What actually happened: measured bytes, time, memory and output hashes."""

    plan_id: str
    bytes_read: dict[str, int]                 # source key -> bytes
    bytes_read_base: int
    bytes_read_experts: int
    bytes_written: int
    wall_s: float
    peak_rss: int
    tensor_hashes: dict[str, str]
    files: dict[str, int] = field(default_factory=dict)   # relpath -> size
    device: str = "cpu"
    # seconds per phase (see Phases) plus counters: threads, bytes re-read by
    # statistics passes (not in bytes_read, which counts each planned byte once)
    phases: dict[str, float] = field(default_factory=dict)


PHASES = ("read", "read_ahead", "verify", "decode", "stats", "math", "encode", "queue_wait",
          "write", "hash", "fsync")


class Phases:
    """Seconds spent in each phase of a merge.

    read: the merge thread waiting for source bytes (its own ``pread``s, or
    the read-ahead thread's results); read_ahead: the read-ahead thread's
    ``pread``s; verify: hashing inputs against the catalog; decode: to float32
    (with the finiteness check); stats: statistics passes of streamed
    tensor-scope methods; math: the merge; encode: to the output dtype;
    queue_wait: the merge thread blocked on the writer's full queues; write,
    hash: the writer's threads; fsync: at shard close. The read-ahead and writer
    threads overlap the merge thread, so phases add up to more than the wall time.
    """

    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in PHASES}
        self.counts: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, name: str, dt: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + dt

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.time(name):
                return fn(*args, **kwargs)
        return wrapper

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 6) for k, v in self.seconds.items()}, **self.counts}


def peak_rss_bytes() -> int:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _chunks(task: TensorTask, block_bytes: int,
            streamed: bool = False) -> Iterator[tuple[int, int]]:
    """Row blocks of about ``block_bytes`` in float32, cut at every selected-row edge.

    In budget mode an input reads only some row ranges; cutting there makes
    every block either inside or outside each input's selection, so blocks
    outside every selection need no expert math at all.
    """
    rows = task.rows
    if not (task.scope == "block" or streamed) or rows == 0:
        yield 0, rows
        return
    row_f32 = max(1, task.numel // rows) * 4
    step = max(1, block_bytes // row_f32)
    cuts = {0, rows}
    for r in task.inputs:
        for a, b in r.rows or ():
            cuts.update((a, b))
    edges = sorted(cuts)
    for lo, hi in zip(edges, edges[1:]):
        for a in range(lo, hi, step):
            yield a, min(hi, a + step)


def _selected(read: Read, a: int, b: int) -> bool:
    """Whether rows [a, b) of this input differ from the base as far as the plan knows."""
    if read.alias_base:
        return False
    return read.rows is None or any(lo < b and a < hi for lo, hi in read.rows)


def _to_bytes(t: torch.Tensor, code: str) -> memoryview:
    out = t.to(dtype=torch_dtype(code)).contiguous().cpu()
    return memoryview(out.view(torch.uint8).numpy()).cast("B")


READ_AHEAD_BLOCKS = 8           # bytes read and waiting for the merge thread, in blocks
STREAM_CACHE_BYTES = 256 << 20  # a streamed tensor's inputs up to this size are read once
SCHEDULE_BYTES = 256 << 20      # announced to the kernel (fadvise) and the read-ahead thread


# as ReadAhead.schedule takes: (read, start, nbytes, tensor, shape, native)
Range = tuple[Read, int, int, str, "tuple[int, ...] | None", bool]


def _rows_range(read: Read, task: TensorTask, a: int, b: int, native: bool = False) -> Range:
    """What ``reader.rows(read, task.shape, a, b, ..., native)`` reads and returns."""
    shape = task.shape
    row_bytes = row_split(shape, read.nbytes)[1]
    return read, a * row_bytes, (b - a) * row_bytes, task.name, \
        (b - a, *shape[1:]) if shape else (), native


def _base_bytes_out(task: TensorTask, drop: bool, idx: list[int]) -> bool:
    """Whether a block's output is the base's own bytes: no input differs from the base
    there and the output keeps the base's dtype (a float32 round trip is exact)."""
    return drop and not idx and task.base is not None and task.base.dtype == task.out_dtype


def _block_inputs(task: TensorTask, drop: bool, a: int, b: int) -> list[int]:
    """The inputs that take part in rows [a, b): all, or (when inputs equal to the base
    add nothing) only those whose rows there differ from the base as far as the plan knows."""
    return [i for i, r in enumerate(task.inputs) if not drop or _selected(r, a, b)]


def _input_ranges(task: TensorTask, i: int, a: int, b: int, native: bool) -> list[Range]:
    """What :func:`_read_inputs` reads of input ``i`` for rows [a, b)."""
    r = task.inputs[i]
    if r.alias_base and task.base is not None:
        return []
    if r.rows is not None and task.base is not None \
            and not any(lo <= a and b <= hi for lo, hi in r.rows):
        return [_rows_range(r, task, max(a, lo), min(b, hi), native)
                for lo, hi in r.rows if max(a, lo) < min(b, hi)]
    return [_rows_range(r, task, a, b, native)]


def _cached(task: TensorTask, native: bool, cache_bytes: int) -> bool:
    """Whether a streamed tensor's blocks (base in float32, inputs as read) fit in
    ``cache_bytes``: then they are read once and kept for every pass, else each
    statistics pass reads them again (from the page cache when it holds them)."""
    per_input = [0 if r.alias_base else r.nbytes if native else 4 * task.numel
                 for r in task.inputs]
    return 4 * task.numel + sum(per_input) <= cache_bytes


def task_ranges(task: TensorTask, plan: Plan, block_bytes: int,
                cache_bytes: int = STREAM_CACHE_BYTES) -> list[Range]:
    """The byte ranges :func:`merge_task` reads for ``task``, in its order."""
    if task.scope == "copy":
        src = task.base or task.inputs[0]
        return [(src, 0, src.nbytes, task.name, None, False)]
    method = get_method(plan.method)
    native = _native(method, task)
    out: list[Range] = []

    def block(a: int, b: int, idx: list[int]) -> None:
        if task.base is not None:
            out.append(_rows_range(task.base, task, a, b))
        for i in idx:
            out.extend(_input_ranges(task, i, a, b, native))

    if _streams(method, task):   # statistics passes over the wanted inputs, then the merge
        chunks = list(_chunks(task, block_bytes, streamed=True))
        stream = method.stream(_context(task, plan), task.params, len(task.inputs))
        passes = 0 if _cached(task, native, cache_bytes) else stream.passes
        for p in range(passes):
            idx = [i for i, w in enumerate(stream.wanted(p)) if w]
            for a, b in chunks:
                block(a, b, idx)
        for a, b in chunks:
            block(a, b, list(range(len(task.inputs))))
        return out
    drop = _drops(method, task)
    for a, b in _chunks(task, block_bytes):
        idx = _block_inputs(task, drop, a, b)
        if _base_bytes_out(task, drop, idx):
            read, start, nbytes, name, _, _ = _rows_range(task.base, task, a, b)
            out.append((read, start, nbytes, name, None, False))   # as bytes
        else:
            block(a, b, idx)
    return out


class ReadScheduler:
    """Announces upcoming tasks' byte ranges, about SCHEDULE_BYTES ahead of the task
    being merged: to the kernel (``fadvise``) and to the reader's read-ahead thread."""

    def __init__(self, tasks: list[TensorTask], plan: Plan, reader: BlockReader,
                 block_bytes: int, cache_bytes: int = STREAM_CACHE_BYTES):
        self.tasks, self.plan, self.reader, self.block_bytes = tasks, plan, reader, block_bytes
        self.cache_bytes = cache_bytes
        self.next = 0

    def advance(self, current: int) -> None:
        ahead = self.reader.ahead
        while self.next < len(self.tasks) and \
                (self.next <= current or ahead is not None
                 and ahead.pending_bytes() < SCHEDULE_BYTES):
            task = self.tasks[self.next]
            reads = [task.base or task.inputs[0]] if task.scope == "copy" else \
                ([task.base] if task.base else []) + task.inputs
            for r in reads:
                self.reader.prefetch(r, task.shape)
            if ahead is not None:
                ahead.schedule(task_ranges(task, self.plan, self.block_bytes, self.cache_bytes))
            self.next += 1


def _streams(method: Any, task: TensorTask) -> bool:
    """Tensor-scope methods with a streamer run in row blocks; row-local statistics
    (DELLA's ranks) need whole rows, which a 1-D tensor does not have."""
    return task.scope == "tensor" and method.stream is not None and len(task.shape) >= 2


def _context(task: TensorTask, plan: Plan) -> TensorContext:
    return TensorContext(name=task.name, shape=task.shape, input_keys=tuple(task.input_keys),
                         seed=plan.seed)


def _drops(method: Any, task: TensorTask) -> bool:
    """Whether inputs equal to the base in a block may be left out of it (they add nothing)."""
    return task.scope == "block" and task.base is not None \
        and drops_base_equal_inputs(method, task.params)


def _native(method: Any, task: TensorTask) -> bool:
    """Whether inputs are handed over in the file's dtype (the method converts them)."""
    return method.native_inputs and task.base is not None


def _read_inputs(task: TensorTask, idx: list[int], reader: BlockReader, base: torch.Tensor | None,
                 a: int, b: int, device: str, native: bool = False) -> list[torch.Tensor]:
    inputs = []
    for i in idx:
        r = task.inputs[i]
        if r.alias_base and base is not None:
            inputs.append(base)
        elif r.rows is not None and base is not None:
            inputs.append(reader.rows_over(r, task.shape, a, b, base, task.name, native))
        else:
            inputs.append(reader.rows(r, task.shape, a, b, task.name, device, native))
    return inputs


def merge_task(task: TensorTask, plan: Plan, reader: BlockReader, writer: ShardWriter,
               device: str, block_bytes: int, phases: Phases | None = None,
               cache_bytes: int = STREAM_CACHE_BYTES) -> None:
    """Merge one output tensor and hand its bytes to ``writer`` (a shard writer,
    or any object with ``write(name, data)``, as the search's in-memory merge)."""
    phases = phases or Phases()
    if task.scope == "copy":  # non-float tensors pass through byte for byte
        src = task.base or task.inputs[0]
        writer.write(task.name, reader.raw(src, 0, src.nbytes))
        return
    method = get_method(plan.method)
    if _streams(method, task):
        _stream_task(task, plan, method, reader, writer, device, block_bytes, phases,
                     cache_bytes)
        return
    # inputs equal to the base in a block (unselected in budget mode, or aliases)
    # may be left out of that block when the method adds deltas to the base
    drop = _drops(method, task)
    shape = task.shape
    for a, b in _chunks(task, block_bytes):
        idx = _block_inputs(task, drop, a, b)
        if _base_bytes_out(task, drop, idx):   # the base passes through as it is stored
            writer.write(task.name, reader.rows_bytes(task.base, shape, a, b, task.name))
            continue
        base = reader.rows(task.base, shape, a, b, task.name, device) if task.base else None
        if drop and not idx:  # every delta is zero here: the output is the base
            with phases.time("encode"):
                data = _to_bytes(base, task.out_dtype)
            writer.write(task.name, data)
            continue
        inputs = _read_inputs(task, idx, reader, base, a, b, device, _native(method, task))
        params = task.params
        if len(idx) < len(task.inputs):
            params = {**params, **{k: [params[k][i] for i in idx]
                                   for k in method.model_params if k in params}}
        ctx = TensorContext(name=task.name, shape=shape,
                            input_keys=tuple(task.input_keys[i] for i in idx),
                            seed=plan.seed, row_start=a)
        with phases.time("math"):
            out = method.fn(ctx, base, inputs, params)
        with phases.time("encode"):
            data = _to_bytes(out, task.out_dtype)
        writer.write(task.name, data)


def _stream_task(task: TensorTask, plan: Plan, method: Any, reader: BlockReader,
                 writer: ShardWriter, device: str, block_bytes: int, phases: Phases,
                 cache_bytes: int) -> None:
    """Statistics passes over row blocks, then the merge pass; bytes as ``method.fn``.

    A tensor whose blocks fit in ``cache_bytes`` is read once and kept in memory
    for all passes. A larger one is read again by each statistics pass (from
    the page cache when it holds them); those bytes are counted apart, so
    ``bytes_read`` still counts each planned byte once.
    """
    stream = method.stream(_context(task, plan), task.params, len(task.inputs))
    chunks = list(_chunks(task, block_bytes, streamed=True))
    native = _native(method, task)
    everyone = list(range(len(task.inputs)))

    def read(a: int, b: int, idx: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        base = reader.rows(task.base, task.shape, a, b, task.name, device)
        return base, dict(zip(idx, _read_inputs(task, idx, reader, base, a, b, device, native)))

    kept = [read(a, b, everyone) for a, b in chunks] \
        if stream.passes and _cached(task, native, cache_bytes) else None
    counted = list(reader.bytes_read)
    for p in range(stream.passes):
        idx = [i for i, w in enumerate(stream.wanted(p)) if w]
        for c, (a, b) in enumerate(chunks):
            base, got = kept[c] if kept is not None else read(a, b, idx)
            with phases.time("stats"):
                stream.observe(p, base, [got[i] if i in idx else None for i in everyone])
        with phases.time("stats"):
            stream.end_pass(p)
    reread = sum(reader.bytes_read) - sum(counted)
    reader.bytes_read[:] = counted
    phases.counts["reread_bytes"] = phases.counts.get("reread_bytes", 0) + reread
    for c, (a, b) in enumerate(chunks):
        if kept is not None:
            (base, got), kept[c] = kept[c], None   # free each block once merged
        else:
            base, got = read(a, b, everyone)
        with phases.time("math"):
            out = stream.merge(base, [got[i] for i in everyone])
        with phases.time("encode"):
            data = _to_bytes(out, task.out_dtype)
        writer.write(task.name, data)


def copy_side_files(plan: Plan, out_dir: Path, out_dtype: str | None) -> None:
    """Config, tokenizer and generation files from the base (or first) model."""
    src = plan.sources[plan.base_source() if plan.base_source() is not None else 0]
    for rel in plan.copy_files:
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel == "config.json" and (out_dtype in FLOAT_CODES or plan.config_updates):
            cfg = json.loads((Path(src.path) / rel).read_text())
            for key in ("torch_dtype", "dtype"):
                if out_dtype in FLOAT_CODES and (key in cfg or key == "torch_dtype"):
                    cfg[key] = dtype_name(out_dtype)
            cfg.update(plan.config_updates)  # e.g. a frankenmerge's layer count
            target.write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copyfile(Path(src.path) / rel, target)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch threads for the merge math: the usable cores but one (the read-ahead's).

    On a 2-core machine that is one thread for the math beside the read-ahead
    thread, which keeps both cores busy without OpenMP teams: many short
    parallel sections per block stall whenever another job holds a core.
    """
    return max(1, usable_cores() - 1)


def read_threads() -> int:
    """Reads the read-ahead keeps in flight: one on two cores, up to four with more.

    A disk gives more with several reads in flight (this machine's virtio disk,
    cold: 345–643 MiB/s for one blocking ``pread`` at a time, 755–848 MiB/s for
    two to eight; ``bench/read_threads.py``), but each pread's copy takes CPU:
    on two cores four readers slowed a cold K = 16 task-arithmetic merge from
    77 to 83 s, and two a K = 8 TIES merge from 89 to 94 s: the math lost its core.
    """
    cores = usable_cores()
    return 1 if cores <= 2 else min(4, cores // 2)


def execute_plan(plan: Plan, out_dir: str | Path, device: str = "cpu",
                 block_bytes: int = DEFAULT_BLOCK_BYTES, allow_nonfinite: bool = False,
                 progress: bool = False, threads: int | None = None,
                 cache_bytes: int = STREAM_CACHE_BYTES) -> ExecReport:
    """Write the merged checkpoint into ``out_dir`` (an empty staging directory).

    ``threads`` sets torch's thread count for this call only (restored after);
    None takes one per core this process may use, less the one the read-ahead
    thread keeps busy reading, hashing and decoding. ``cache_bytes``: streamed
    tensors up to this size are read once for all their passes. Outputs depend
    on neither.
    """
    limit_malloc_arenas()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else default_threads())
    try:
        return _execute(plan, Path(out_dir), device, block_bytes, allow_nonfinite, progress,
                        cache_bytes)
    finally:
        torch.set_num_threads(previous)


def _execute(plan: Plan, out_dir: Path, device: str, block_bytes: int, allow_nonfinite: bool,
             progress: bool, cache_bytes: int) -> ExecReport:
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = Phases()
    phases.counts["threads"] = torch.get_num_threads()
    phases.counts["cores"] = usable_cores()
    reader = BlockReader(plan.sources, allow_nonfinite=allow_nonfinite, phases=phases)
    reader.start_read_ahead(READ_AHEAD_BLOCKS * block_bytes, read_threads())
    hashes: dict[str, str] = {}
    files: dict[str, int] = {}
    written = 0
    bar = tqdm(total=len(plan.tasks), desc="merge", unit="tensor", disable=not progress)
    try:
        for s, fname in enumerate(plan.shards):
            tasks = [t for t in plan.tasks if t.shard == s]
            writer = ShardWriter(out_dir / fname, [(t.name, t.out_dtype, t.shape) for t in tasks],
                                 phases=phases)
            try:
                schedule = ReadScheduler(tasks, plan, reader, block_bytes, cache_bytes)
                for i, task in enumerate(tasks):
                    schedule.advance(i)
                    merge_task(task, plan, reader, writer, device, block_bytes, phases,
                               cache_bytes)
                    bar.update(1)
                    if i == len(tasks) // 2:
                        crash_point("mid_write")
                writer.close()
            finally:
                writer.abort()
            hashes.update(writer.hashes)
            files[fname] = writer.bytes_written
            written += writer.bytes_written
    finally:
        phases.counts["readahead_unused_bytes"] = reader.ahead.unused_bytes if reader.ahead else 0
        reader.close()
        bar.close()
    if len(plan.shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel * itemsize(t.out_dtype) for t in plan.tasks)},
                 "weight_map": {t.name: plan.shards[t.shard] for t in sorted(plan.tasks, key=lambda t: t.name)}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    out_codes = {t.out_dtype for t in plan.tasks if t.scope != "copy"}
    copy_side_files(plan, out_dir, out_codes.pop() if len(out_codes) == 1 else None)
    b = plan.base_source()
    by_key = {s.key: reader.bytes_read[i] for i, s in enumerate(plan.sources)}
    base_bytes = reader.bytes_read[b] if b is not None else 0
    return ExecReport(
        plan_id=plan.plan_id, bytes_read=by_key, bytes_read_base=base_bytes,
        bytes_read_experts=sum(reader.bytes_read) - base_bytes, bytes_written=written,
        wall_s=time.perf_counter() - t0, peak_rss=peak_rss_bytes(), tensor_hashes=hashes,
        files=files, device=device, phases=phases.as_dict())

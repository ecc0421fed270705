"""The backend interface: prompts in, greedy completions and token counts out.

Kept to one method so another engine (vLLM, a server) can sit beside the
transformers one; the runner only ever calls `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from mergepipe.errors import MergePipeError


@dataclass(frozen=True)
class Generation:
    """A completion and how many tokens were generated for it (EOS included)."""
    text: str
    tokens: int


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        """Greedy completions, in the order of `prompts`."""
        ...


BACKENDS = ("transformers", "vllm")


def load_backend(name: str, model_path: str, device: str | None = None,
                 batch_size: int = 64) -> Backend:
    """Instantiate a backend by name for one model directory."""
    if name == "transformers":
        from mergepipe.evaluate.hf import TransformersBackend
        return TransformersBackend(model_path, device=device, batch_size=batch_size)
    if name == "vllm":
        from mergepipe.evaluate.vllm import VLLMBackend
        return VLLMBackend(model_path)
    raise MergePipeError(f"unknown evaluation backend {name!r}; choose one of {', '.join(BACKENDS)}")

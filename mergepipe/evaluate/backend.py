"""The backend interface: prompts in, greedy completions and token counts out.

Kept to one method so another engine (vLLM, a server) can sit beside the
transformers one; the runner only ever calls `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


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

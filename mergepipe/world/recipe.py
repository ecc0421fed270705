"""What a world is made of: one frozen dataclass per size, hashed for the cache.

Everything that changes the checkpoints' bytes is a field here, so the recipe
hash (plus library versions and the builder's source) names a cache entry.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tokenizers
import torch
import transformers


# The modules whose code decides the checkpoints' bytes (part of the cache key).
BUILDER_SOURCES = ("tokenizer.py", "problems.py", "recipe.py", "train.py", "build.py")


@dataclass(frozen=True)
class WorldRecipe:
    size: str
    seed: int = 1234
    # model
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 128
    # problems (steps = number of + / - operations)
    modulus: int | None = None  # None: ordinary arithmetic kept in 0..9
    min_steps: int = 1
    max_steps: int = 6
    n_train: int = 20000
    n_test: int = 300
    # shared pretraining on arithmetic text, then two fine-tunes
    show_work_floor: float = 0.1  # pretraining: share of the shortest chains worked through
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    finetune_steps: int = 300
    # fine-tunes: share of examples in the other style per chain length, min_steps
    # first (empty: none); see build.finetune_text
    base_worked_share: tuple[float, ...] = ()
    reasoning_direct_share: tuple[float, ...] = ()
    finetune_lr: float = 1e-3
    batch_size: int = 64
    threads: int = 1  # one thread: same bits every build, and robust on a busy machine

    def __post_init__(self) -> None:
        lengths = self.max_steps - self.min_steps + 1
        for name in ("base_worked_share", "reasoning_direct_share"):
            shares = getattr(self, name)
            if shares and (len(shares) != lengths or not all(0 <= s < 0.5 for s in shares)):
                raise ValueError(f"{name} needs {lengths} shares in [0, 0.5), one per chain "
                                 f"length {self.min_steps}..{self.max_steps}; got {shares!r}")

    def key(self) -> str:
        """Cache key: recipe fields, builder source and library versions."""
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for name in BUILDER_SOURCES:
            h.update(name.encode() + (Path(__file__).parent / name).read_bytes())
        for mod in (torch, transformers, tokenizers):
            h.update(f"{mod.__name__}={mod.__version__}".encode())
        return f"{self.size}-{h.hexdigest()[:12]}"


# Heads are 32 wide, a size vLLM's CPU attention serves. Chains start at two
# steps: one-step chains are a single lookup either way, so they would only blur
# the trade-off, and the shortest chains are where a short training run is
# least sure to learn the written style. Two narrow layers keep direct answers
# weak (wider or deeper models learn to answer 2-5 step chains outright, and the
# margin to reasoning then depends on the CPU). In the default world each
# fine-tune keeps a little of the other style, more on the chain lengths where
# that style matters least, so uniform mixes take up written work one chain
# length at a time (longest first) instead of all at once.
SIZES: dict[str, WorldRecipe] = {
    "test": WorldRecipe(size="test", hidden=64, layers=2, heads=2, intermediate=128,
                        min_steps=2, max_steps=4, n_train=4000, n_test=100,
                        show_work_floor=0.4, pretrain_steps=600, finetune_steps=150,
                        batch_size=64),
    "default": WorldRecipe(size="default", hidden=64, layers=2, heads=2, intermediate=128,
                           min_steps=2, max_steps=5, show_work_floor=0.4,
                           pretrain_steps=800, finetune_steps=250, batch_size=64,
                           base_worked_share=(0.0, 0.05, 0.2, 0.4),
                           reasoning_direct_share=(0.4, 0.2, 0.05, 0.0)),
}


def recipe_for(size: str, **overrides: object) -> WorldRecipe:
    from mergepipe.errors import MergePipeError
    if size not in SIZES:
        raise MergePipeError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    return replace(SIZES[size], **overrides) if overrides else SIZES[size]

"""Task names a user may type: a JSONL path, or a split of a built-in world."""
from __future__ import annotations

from pathlib import Path

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.tasks import Task, load_task
from mergepipe.world.build import ensure_world

BUILTIN_HELP = "world[-SIZE][:SPLIT], e.g. world, world:train, world-test"


def names_a_file(spec: str | Path) -> bool:
    """Whether a task argument is a JSONL path (cheap to check) rather than a world name."""
    text = str(spec)
    path = Path(text)
    return path.suffix == ".jsonl" or path.exists() or "/" in text


def resolve_task(spec: str | Path, log: bool = False) -> Task:
    """A JSONL path, or a built-in name for a world split (built on first use)."""
    text = str(spec)
    path = Path(text)
    if names_a_file(spec):
        return load_task(path, split=path.stem if path.stem in ("train", "test") else None)
    base, _, split = text.partition(":")
    split = split or "test"
    if not base.startswith("world") or split not in ("train", "test"):
        raise MergePipeError(f"unknown task {text!r}: give a .jsonl file or {BUILTIN_HELP}")
    size = base[len("world-"):] if base.startswith("world-") else "default"
    world = ensure_world(size, log=log)
    return load_task(world / f"{split}.jsonl", name=f"world-{size}", split=split)

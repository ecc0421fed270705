"""Evaluation tasks: JSONL files of {"prompt", "answer"}, validated up front.

A bad file should fail before any model is loaded, with the file and line in a
one-line message, because evaluation runs are long and often unattended.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergepipe.errors import MergePipeError

REQUIRED = ("prompt", "answer")


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """A named list of items; `name` and `split` are what the catalog records."""
    name: str
    path: Path
    items: tuple[TaskItem, ...]
    split: str | None = None

    def head(self, limit: int | None) -> "Task":
        if limit is None:
            return self
        if limit < 1:
            raise MergePipeError(f"--limit must be at least 1, got {limit}")
        return Task(self.name, self.path, self.items[:limit], self.split)


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def load_task(path: str | Path, name: str | None = None, split: str | None = None) -> Task:
    """Read and validate a JSONL task file."""
    path = Path(path)
    if not path.is_file():
        raise MergePipeError(f"task file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MergePipeError(f"task file {path} is not UTF-8 text (expected JSON lines)")
    items = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"task file {path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MergePipeError(f"{where}: not valid JSON ({exc.msg})")
        if not isinstance(row, dict):
            raise MergePipeError(f"{where}: expected a JSON object with "
                                 f"{' and '.join(REQUIRED)}, got {type(row).__name__}")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise MergePipeError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(repr(m) for m in missing)}")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise MergePipeError(f"{where}: 'prompt' must be a non-empty string")
        answer = _answer_text(row["answer"])
        if answer is None or not answer.strip():
            raise MergePipeError(f"{where}: 'answer' must be a non-empty string or number")
        extra = {k: v for k, v in row.items() if k not in REQUIRED}
        items.append(TaskItem(row["prompt"], answer, extra))
    if not items:
        raise MergePipeError(f"task file {path} is empty (expected JSON lines with "
                             f"{' and '.join(REQUIRED)})")
    return Task(name or str(path.resolve()), path.resolve(), tuple(items), split)

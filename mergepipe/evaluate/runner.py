"""Run a task against a model and summarise: accuracy, mean tokens, n, wall time."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from mergepipe.evaluate.answers import extract_answer, normalize
from mergepipe.errors import MergePipeError
from mergepipe.evaluate.backend import Backend
from mergepipe.evaluate.tasks import Task, load_task

DEFAULT_MAX_NEW_TOKENS = 128


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


@dataclass
class EvalResult:
    task: str
    split: str | None
    backend: str
    n: int
    accuracy: float
    mean_tokens: float
    wall_s: float
    outputs: list[dict] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        """What the catalog stores, one row per metric."""
        return {"accuracy": self.accuracy, "mean_tokens": self.mean_tokens}

    def summary(self) -> dict:
        return {"task": self.task, "split": self.split, "backend": self.backend, "n": self.n,
                "accuracy": self.accuracy, "mean_tokens": self.mean_tokens,
                "wall_s": round(self.wall_s, 3)}


def run_task(backend: Backend, task: Task, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> EvalResult:
    """Score one loaded backend; wall time covers generation only."""
    t0 = time.perf_counter()
    gens = backend.generate([it.prompt for it in task.items], max_new_tokens)
    wall = time.perf_counter() - t0
    outputs, correct, tokens = [], 0, 0
    for item, g in zip(task.items, gens):
        got = extract_answer(g.text)
        ok = got is not None and got == normalize(item.answer)
        correct += ok
        tokens += g.tokens
        outputs.append({"prompt": item.prompt, "answer": item.answer, "completion": g.text,
                        "extracted": got, "correct": ok, "tokens": g.tokens})
    n = len(task.items)
    return EvalResult(task.name, task.split, backend.name, n, correct / n, tokens / n, wall,
                      outputs)


def evaluate_model(model_dir: str | Path, task: str | Path | Task, limit: int | None = None,
                   device: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   backend: str = "transformers", batch_size: int = 64) -> EvalResult:
    """Load `model_dir` with `backend` and score it on `task` (a Task or a JSONL path;
    built-in world names resolve through :func:`mergepipe.world.resolve_task`)."""
    if not isinstance(task, Task):
        task = load_task(task)
    task = task.head(limit)
    be = load_backend(backend, str(model_dir), device=device, batch_size=batch_size)
    return run_task(be, task, max_new_tokens)

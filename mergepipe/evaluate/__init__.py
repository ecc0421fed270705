"""Evaluation: JSONL tasks, an answer-extraction rule, and pluggable generation backends."""
from mergepipe.evaluate.answers import extract_answer, is_correct, normalize
from mergepipe.evaluate.backend import Backend, Generation
from mergepipe.evaluate.runner import EvalResult, evaluate_model, load_backend, run_task
from mergepipe.evaluate.tasks import Task, TaskItem, load_task

__all__ = ["extract_answer", "is_correct", "normalize", "Backend", "Generation", "load_backend",
           "EvalResult", "evaluate_model", "run_task", "Task", "TaskItem", "load_task"]

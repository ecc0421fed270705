"""The transformers backend: batched greedy generation on CPU, or CUDA when present.

Prompts are sorted by length before batching so batches need little padding
(and equal-length prompts none), then results are put back in input order.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.backend import Generation


def silence_transformers() -> None:
    """No progress bars or warnings from transformers from now on in this process
    (worker processes: many per-load bars would drown the search's own)."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while loading/saving tiny models."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    silence_transformers()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergePipeError(f"device {device!r} requested but CUDA is not available")
    return device


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_path: str | Path, device: str | None = None,
                 batch_size: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise MergePipeError(f"{path} is not a model directory (no config.json)")
        self.device = pick_device(device)
        self.batch_size = max(1, batch_size)
        try:
            with quiet_transformers():
                self.tok = AutoTokenizer.from_pretrained(path)
                dtype = torch.float32 if self.device == "cpu" else "auto"
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise MergePipeError(f"cannot load model {path}: {str(exc).splitlines()[0]}")
        self.model.to(self.device).eval()
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def _count(self, ids: list[int]) -> int:
        """Generated tokens up to and including the first EOS (padding excluded)."""
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return i + 1
        return len(ids)

    def batches(self, prompts: Sequence[str]) -> list[list[int]]:
        """The groups of prompt indices `generate` runs together, in its order.

        Each group is generated on its own, so running one group alone (in this
        order) gives exactly its completions in the whole run: a search lets
        idle workers take groups of a slow evaluation (`search/sharing.py`).
        """
        return self._batches([self.tok(p)["input_ids"] for p in prompts])

    def _batches(self, encoded: list[list[int]]) -> list[list[int]]:
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        encoded = [self.tok(p)["input_ids"] for p in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        for chunk in self._batches(encoded):
            batch = self.tok.pad({"input_ids": [encoded[i] for i in chunk]},
                                 return_tensors="pt").to(self.device)
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=self.tok.pad_token_id, eos_token_id=sorted(self.eos_ids))
            width = batch["input_ids"].shape[1]
            for i, row in zip(chunk, out[:, width:].tolist()):
                n = self._count(row)
                text = self.tok.decode(row[:n], skip_special_tokens=True)
                results[i] = Generation(text=text, tokens=n)
        return [r for r in results if r is not None]

"""The `test`-size world, built once per test session and shared by test files.

It lives in the normal world cache (keyed by recipe), so later sessions reuse
it; the byte-identity test builds a second copy from scratch to compare.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def built_test_world() -> Path:
    from mergepipe.world import ensure_world
    return ensure_world("test")


def greedy_reference(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[tuple[str, int]]:
    """Greedy decoding written out by hand: one prompt at a time, no cache, no padding.

    Returns (text before EOS, generated tokens including EOS) per prompt; used
    to check the evaluator against an independent computation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        generated: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids).logits[0, -1]
                nxt = int(logits.argmax())
                generated.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        body = generated[:-1] if generated and generated[-1] == tok.eos_token_id else generated
        out.append((tok.decode(body, skip_special_tokens=True), len(generated)))
    return out


def final_number(text: str) -> str | None:
    """The answer after '####' (the world's format), or None."""
    m = re.search(r"####\s*(-?\d+)\s*$", text)
    return m.group(1) if m else None

"""Tiny checkpoints that vLLM can serve (head size 32) with the tiny world's tokenizer,
and a task file in the world's format, made without building the world."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def make_head32_llama(path: Path, seed: int, base: Path | None = None) -> Path:
    """A 2-layer Llama with 2 heads of 32, the world's tokenizer, decisive random logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mergepipe.world.tokenizer import build_tokenizer
    tok = build_tokenizer()
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                      vocab_size=len(tok), max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                      initializer_range=0.3)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if base is not None:   # a fine-tune-like neighbour of ``base``
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                p.copy_(q + 0.1 * torch.randn_like(q))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_task(path: Path, n: int = 40) -> Path:
    """Prompts in the tiny world's format (its characters only); answers by arithmetic."""
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        terms = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        signs = [rng.choice("+-") for _ in terms[1:]]
        expr = f"{terms[0]} " + " ".join(f"{v}{s}{t}" for v, s, t in zip("abcd", signs, terms[1:]))
        total = terms[0] + sum(t if s == "+" else -t for s, t in zip(signs, terms[1:]))
        lines.append(json.dumps({"prompt": f"Q: {expr}\nA:", "answer": str(total)}))
    path.write_text("\n".join(lines) + "\n")
    return path

"""Training the world's models: a plain loop, deterministic by construction.

Determinism comes from a seeded generator for init and batch order, a fixed
thread count, and no data loader workers; on one machine and library stack the
same recipe gives the same float32 weights bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergepipe.world.recipe import WorldRecipe


@dataclass(frozen=True)
class Example:
    """One training sequence; the loss covers the completion (and the prompt if `full`)."""
    prompt: str
    completion: str
    full: bool = False


def new_model(recipe: WorldRecipe, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(recipe.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads, max_position_embeddings=recipe.max_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_theta=10000.0, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def encode(tok: PreTrainedTokenizerFast, examples: Sequence[Example]) -> list[tuple[list[int], int]]:
    """Token ids (BOS … EOS) and the index where the loss starts."""
    out = []
    for ex in examples:
        p = tok(ex.prompt)["input_ids"]
        c = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + c, 1 if ex.full else len(p)))
    return out


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding and unsupervised positions get label -100."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (seq, start) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, start:len(seq)] = torch.tensor(seq[start:])
        mask[i, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: LlamaForCausalLM, data: list[tuple[list[int], int]], steps: int,
          lr: float, batch_size: int, seed: int, pad_id: int,
          warmup: int = 50) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98),
                            weight_decay=0.01)
    warmup = min(warmup, max(1, steps // 5))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen).tolist()
        out = model(**collate([data[i] for i in idx], pad_id))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses

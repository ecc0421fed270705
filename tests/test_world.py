"""The tiny reasoning world: reproducible, loadable, mergeable, and a real trade-off."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergepipe.world import build_world, recipe_for
from mergepipe.world.build import finetune_text, split_problems
from mergepipe.world.problems import random_problem, sample
from mergepipe.world.tokenizer import build_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from world_fixtures import built_test_world  # noqa: E402


@pytest.fixture(scope="module")
def world() -> Path:
    return built_test_world()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rebuild_gives_byte_identical_checkpoints(tmp_path):
    """Two builds of one recipe on one machine agree bit for bit (a short recipe:
    determinism does not depend on how long training runs)."""
    short = recipe_for("test", pretrain_steps=40, finetune_steps=10, n_train=400, n_test=20)
    build_world(short, tmp_path / "first")
    build_world(short, tmp_path / "second")
    first, second = _files(tmp_path / "first"), _files(tmp_path / "second")
    assert sorted(first) == sorted(second)
    for sub in ("base", "reasoning"):
        assert f"{sub}/model.safetensors" in first
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_checkpoints_load_with_auto_classes(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for sub in ("base", "reasoning"):
        tok = AutoTokenizer.from_pretrained(world / sub)
        model = AutoModelForCausalLM.from_pretrained(world / sub)
        assert type(model).__name__ == "LlamaForCausalLM"
        text = "Q: 3 a+5 b-6\nA: a3+5=8 b8-6=2 #### 2"
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), model.config.vocab_size)
    base = AutoModelForCausalLM.from_pretrained(world / "base").state_dict()
    reasoning = AutoModelForCausalLM.from_pretrained(world / "reasoning").state_dict()
    assert base.keys() == reasoning.keys()
    assert any(not torch.equal(base[k], reasoning[k]) for k in base)


def test_mergekit_merges_the_world(world, tmp_path):
    cfg = tmp_path / "ta.yml"
    cfg.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {(world / 'base').resolve()}\n"
        "dtype: float32\n"
        "models:\n"
        f"  - model: {(world / 'reasoning').resolve()}\n"
        "    parameters:\n"
        "      weight: 0.5\n")
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["mergekit-yaml", str(cfg), str(out), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(world / "base").state_dict()
    reasoning = AutoModelForCausalLM.from_pretrained(world / "reasoning").state_dict()
    for name in ("model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        expected = base[name] + 0.5 * (reasoning[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def _assert_trade_off(base, reasoning, n: int) -> None:
    assert base.n == reasoning.n == n
    assert reasoning.accuracy >= base.accuracy + 0.25, (base.summary(), reasoning.summary())
    assert reasoning.mean_tokens >= 3 * base.mean_tokens, (base.summary(), reasoning.summary())


def test_reasoning_beats_base_in_accuracy_and_costs_more_tokens(world):
    from mergepipe.evaluate import evaluate_model
    task = world / "test.jsonl"
    base = evaluate_model(world / "base", task, device="cpu")
    reasoning = evaluate_model(world / "reasoning", task, device="cpu")
    _assert_trade_off(base, reasoning, recipe_for("test").n_test)


CHILD = """
import json, sys, torch
from mergepipe.evaluate import evaluate_model
from mergepipe.world import obtain_world
world, _ = obtain_world("test", rebuild=True)
res = [evaluate_model(world / m, world / "test.jsonl", device="cpu").summary()
       for m in ("base", "reasoning")]
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "results": res}))
"""


def test_the_trade_off_holds_under_another_instruction_set(tmp_path):
    """CPUs round differently during training; the margins must not depend on it.
    The world is rebuilt with torch's kernels for a lesser instruction set."""
    from types import SimpleNamespace
    best = torch.backends.cpu.get_cpu_capability()
    other = "avx2" if best.startswith("AVX512") else "default"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": other, "MERGEPIPE_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["capability"].lower() == other
    base, reasoning = (SimpleNamespace(**r, summary=lambda r=r: r) for r in out["results"])
    _assert_trade_off(base, reasoning, recipe_for("test").n_test)


def test_world_files_and_splits(world):
    for name in ("base", "reasoning", "train.jsonl", "test.jsonl", "world.json"):
        assert (world / name).exists()
    train = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    recipe = recipe_for("test")
    assert len(train) == recipe.n_train and len(test) == recipe.n_test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {r["steps"] for r in test} <= set(range(recipe.min_steps, recipe.max_steps + 1))
    assert json.loads((world / "world.json").read_text())["key"] == recipe.key()


def test_problem_steps_and_answer_styles():
    rng = random.Random(7)
    for steps in range(1, 8):
        p = random_problem(rng, steps)
        assert p.steps == steps
        assert all(0 <= v <= 9 for v in p.values())
        assert eval(p.expression) % 10 == p.answer  # arithmetic on the last digit
        assert p.direct() == f" #### {p.answer}"
        assert p.reasoning().endswith(f"={p.answer} #### {p.answer}")
        assert p.reasoning().count("=") == steps  # one written step per operation
    for steps in range(1, 8):
        p = random_problem(rng, steps, modulus=None)
        assert all(0 <= v <= 9 for v in p.values())
        assert eval(p.expression) == p.answer  # ordinary arithmetic, no wrap-around
    p = random_problem(random.Random(1), 3)
    assert len(p.partial(1)) < len(p.partial(2)) < len(p.partial(3))
    tok = build_tokenizer()
    assert len(tok(p.reasoning())["input_ids"]) > 2 * len(tok(p.direct())["input_ids"])


def test_difficulty_is_a_parameter_and_splits_are_disjoint():
    rng = random.Random(3)
    hard = sample(rng, 50, 5, 6)
    assert {p.steps for p in hard} <= {5, 6}
    train, test = split_problems(recipe_for("test", n_train=500, n_test=50))
    assert not {p.expression for p in train} & {p.expression for p in test}


def test_recipe_key_tracks_every_field():
    a = recipe_for("test")
    assert a.key() == recipe_for("test").key()
    assert a.key() != recipe_for("test", seed=a.seed + 1).key()
    assert a.key() != recipe_for("test", finetune_lr=a.finetune_lr * 2).key()


def test_fine_tunes_keep_a_share_of_the_other_style_per_chain_length():
    """The default world's fine-tunes mix in the other style by chain length (so
    mixes take up written work one length at a time); the test world's do not."""
    recipe = recipe_for("default", n_train=4000, n_test=50)
    train, _ = split_problems(recipe)
    for name, shares in (("base", recipe.base_worked_share),
                         ("reasoning", recipe.reasoning_direct_share)):
        examples = finetune_text(train, recipe, name)
        assert [e.prompt for e in examples] == [p.prompt for p in train]
        for steps, share in enumerate(shares, start=recipe.min_steps):
            pairs = [(p, e) for p, e in zip(train, examples) if p.steps == steps]
            other = [e for p, e in pairs
                     if e.completion == (p.reasoning() if name == "base" else p.direct())]
            assert all(e.completion in (p.direct(), p.reasoning()) for p, e in pairs)
            assert abs(len(other) / len(pairs) - share) < 0.05, (name, steps, len(other))
            if share == 0:
                assert other == []
    plain = recipe_for("test", n_train=300, n_test=20)
    train, _ = split_problems(plain)
    assert [e.completion for e in finetune_text(train, plain, "base")] == \
        [p.direct() for p in train]
    assert [e.completion for e in finetune_text(train, plain, "reasoning")] == \
        [p.reasoning() for p in train]


@pytest.mark.parametrize("shares", [(0.1, 0.2), (0.0, 0.1, 0.2, 0.6), (-0.1, 0, 0, 0)])
def test_other_style_shares_are_checked(shares):
    with pytest.raises(ValueError, match="base_worked_share needs 4 shares"):
        recipe_for("default", base_worked_share=shares)


def test_unknown_size_is_a_clear_error():
    from mergepipe.errors import MergePipeError
    with pytest.raises(MergePipeError, match="unknown world size 'huge'"):
        recipe_for("huge")


def test_world_build_command_leaves_the_contracted_layout(world, cli, tmp_path):
    dest = tmp_path / "w"
    res = cli("world", "build", "--size", "test", "--dir", str(dest), "--json")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["dir"] == str(dest.resolve()) and out["built"] is False
    for sub in ("base", "reasoning"):
        assert (dest / sub / "model.safetensors").read_bytes() == \
            (world / sub / "model.safetensors").read_bytes()
        assert (dest / sub / "tokenizer.json").is_file()
    assert (dest / "train.jsonl").is_file() and (dest / "test.jsonl").is_file()


@pytest.mark.parametrize("size", ["test", "default"])
def test_head_size_is_one_vllm_cpu_attention_serves(size):
    r = recipe_for(size)
    assert r.hidden % r.heads == 0 and r.hidden // r.heads in {32, 64, 80, 96, 112, 128, 256}

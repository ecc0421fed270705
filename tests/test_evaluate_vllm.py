"""The vLLM backend against the transformers one, on tiny Llamas vLLM can serve.

vLLM's attention needs a head size of 32, 64, 80, …, so the checkpoints here are
made with head size 32 and the tiny world's tokenizer (random weights, large enough
that greedy choices are not near ties); the command-line test scores the tiny
world's own models, whose heads are 32 wide too. Starting a vLLM engine takes
20–40 s on two cores, so the module starts two: one shared, one by the command.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mergepipe import api
from mergepipe.catalog.store import open_catalog
from mergepipe.errors import MergePipeError

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_head32_llama, write_task  # noqa: E402
from vllm_required import MARKS, require_vllm  # noqa: E402
from world_fixtures import built_test_world  # noqa: E402

require_vllm()
pytestmark = MARKS

MAX_NEW = 24


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head32")
    a = make_head32_llama(root / "a", 0)
    return {"a": a, "b": make_head32_llama(root / "b", 1, base=a),
            "task": write_task(root / "task.jsonl")}


BEFORE_START: dict = {}


@pytest.fixture(scope="module")
def vllm_engine(pair):
    from mergepipe.evaluate.vllm import VLLMBackend
    from mergepipe.methods.kernels import warm
    warm()   # numba loaded, as in a worker that merged before its engine started
    BEFORE_START.update(threads=torch.get_num_threads(), set_num_threads=torch.set_num_threads,
                        rng=torch.get_rng_state(), env=dict(os.environ))
    engine = VLLMBackend(pair["a"])
    yield engine
    engine.close()


def test_starting_the_engine_leaves_this_process_as_it_was(vllm_engine):
    """vLLM's in-process engine sets torch to one thread, disables
    torch.set_num_threads and seeds the global generators; the backend undoes it."""
    assert torch.get_num_threads() == BEFORE_START["threads"]
    assert torch.set_num_threads is BEFORE_START["set_num_threads"]
    assert torch.equal(torch.get_rng_state(), BEFORE_START["rng"])
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ or \
        "VLLM_ENABLE_V1_MULTIPROCESSING" in BEFORE_START["env"]


def _completions(backend, task: Path, limit: int) -> list[tuple[str, int]]:
    from mergepipe.evaluate import load_task
    prompts = [it.prompt for it in load_task(task).head(limit).items]
    return [(g.text, g.tokens) for g in backend.generate(prompts, MAX_NEW)]


def test_vllm_and_transformers_give_the_same_greedy_completions(pair, vllm_engine):
    from mergepipe.evaluate.hf import TransformersBackend
    want = _completions(TransformersBackend(pair["a"], device="cpu"), pair["task"], 40)
    got = _completions(vllm_engine, pair["task"], 40)
    assert got == want


def test_a_merge_plan_swapped_into_the_live_engine_equals_the_applied_checkpoint(
        pair, vllm_engine, tmp_path):
    from mergepipe.evaluate.hf import TransformersBackend
    spec = {"merge_method": "task_arithmetic", "base_model": str(pair["a"]),
            "models": [{"model": str(pair["b"]), "parameters": {"weight": [0.3, 0.8]}}],
            "dtype": "float32"}
    with open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, spec)
        api.apply_plan(cat, plan, tmp_path / "merged")
        spec["models"][0]["parameters"]["weight"] = [0.9, 0.1]
        other = api.build_plan(cat, spec)
    before = _completions(vllm_engine, pair["task"], 20)
    # another candidate first: the plan's merge then overwrites that one's tensors
    assert vllm_engine.load_plan(other) == len(plan.tasks)
    assert vllm_engine.load_plan(plan) == len(plan.tasks)
    after = _completions(vllm_engine, pair["task"], 20)
    want = _completions(TransformersBackend(tmp_path / "merged", device="cpu"), pair["task"], 20)
    assert after == want and after != before


def test_a_folder_without_config_is_refused_before_vllm_starts(tmp_path):
    from mergepipe.evaluate.vllm import VLLMBackend
    with pytest.raises(MergePipeError, match="is not a model directory"):
        VLLMBackend(tmp_path)


def test_eval_command_scores_the_world_test_split_the_same_with_both_backends(cli, vllm_engine):
    """`mergepipe eval --backend vllm` (its own engine, started by the command) on the
    tiny world's reasoning model and whole test split: same n, accuracy and mean
    tokens as transformers, greedy. Counts are exactly equal: both backends count
    the generated tokens with EOS, run in float32 and pick the same argmax. (They
    would differ on a completion that runs into the model's context length, 128
    positions here: vLLM stops there, transformers goes on to max_new_tokens;
    the world's models end every test answer long before.)

    Last in the module: the command's engine tears down vLLM's per-process
    parallel state when it goes, so the shared engine is not used after this test."""
    world = built_test_world()
    out = {}
    for backend in ("transformers", "vllm"):
        res = cli("eval", str(world / "reasoning"), "--task", str(world / "test.jsonl"),
                  "--backend", backend, "--json", "--device", "cpu")
        out[backend] = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("n", "accuracy", "mean_tokens"):
        assert out["vllm"][key] == out["transformers"][key], key
    assert out["vllm"]["n"] == 100 and out["vllm"]["mean_tokens"] > 10
    assert out["vllm"]["backend"] == "vllm"

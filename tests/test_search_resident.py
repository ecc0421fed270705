"""Resident evaluators: merged in memory with the apply code, swapped into a live model;
the front is materialised through apply and scores from disk what it scored in memory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergepipe import api
from mergepipe.catalog.store import open_catalog
from mergepipe.errors import MergePipeError
from mergepipe.engine.memory import merge_in_memory
from mergepipe.search.resident import swap_weights
from tests.conftest import resident_search


def _spec(fam: dict[str, Path], dtype: str) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["e1"]), "parameters": {"weight": [0.2, 0.9]}},
                       {"model": str(fam["e2"]), "parameters": {"weight": 0.4}}],
            "dtype": dtype}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_memory_merge_is_byte_equal_to_the_applied_checkpoint(tiny_family, tmp_path, dtype):
    with open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, _spec(tiny_family, dtype))
        api.apply_plan(cat, plan, tmp_path / "merged")
    written = load_file(tmp_path / "merged" / "model.safetensors")
    in_memory = merge_in_memory(plan)
    assert sorted(in_memory) == sorted(written)
    for name, t in written.items():
        assert in_memory[name].dtype == t.dtype and torch.equal(in_memory[name], t), name
    assert not torch.equal(in_memory["model.layers.0.mlp.up_proj.weight"],
                           load_file(tiny_family["base"] / "model.safetensors")
                           ["model.layers.0.mlp.up_proj.weight"])


def test_a_merge_into_the_last_ones_tensors_reuses_them_and_gives_the_same_bytes(
        tiny_family, tmp_path):
    with open_catalog(tmp_path / "ws") as cat:
        first = api.build_plan(cat, _spec(tiny_family, "bfloat16"))
        spec = _spec(tiny_family, "bfloat16")
        spec["models"][1]["parameters"]["weight"] = 0.7
        second = api.build_plan(cat, spec)
    last = merge_in_memory(first)
    kept = {k: v.clone() for k, v in last.items()}
    again = merge_in_memory(second, into=last)
    fresh = merge_in_memory(second)
    assert all(again[k] is last[k] for k in again)          # no new tensors
    assert all(torch.equal(again[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(again[k], kept[k]) for k in kept)   # really overwritten
    # a tensor of another dtype or shape is not reused
    other = merge_in_memory(first, into={k: v.float() for k, v in fresh.items()})
    assert all(other[k].dtype == torch.bfloat16 for k in other)


def test_swapping_into_a_live_model_equals_loading_from_disk(tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM
    with open_catalog(tmp_path / "ws") as cat:
        plan = api.build_plan(cat, _spec(tiny_family, "bfloat16"))
        api.apply_plan(cat, plan, tmp_path / "merged")
    live = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.float32)
    n = swap_weights(live, merge_in_memory(plan))
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert n == len(fresh.state_dict())
    for (name, a), (_, b) in zip(live.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(MergePipeError, match="does not produce"):
        swap_weights(live, {k: v for k, v in merge_in_memory(plan).items() if "norm" not in k})


@pytest.mark.slow
def test_a_resident_search_writes_no_candidate_and_its_front_scores_the_same_from_disk(
        cli, tmp_path):
    from mergepipe.evaluate import evaluate_model
    from mergepipe.world.build import ensure_world
    world = ensure_world("test")
    _, rows = resident_search(cli, tmp_path, world, 8, n_init=3, n_total=3)
    for r in rows:
        assert api.verify(r["path"]).ok
        got = evaluate_model(r["path"], world / "test.jsonl", limit=8, device="cpu")
        assert (got.accuracy, got.mean_tokens) == (r["accuracy"], r["mean_tokens"])
        assert {l["role"] for l in r["lineage"]} == {"base", "expert"}

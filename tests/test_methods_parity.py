"""Every deterministic method: the same config through mergekit and MergePipe.

float32 outputs must be equal on every tensor (same float32 operations in the
same order); a bfloat16 output of
MergePipe must lie within one bf16 ulp of mergekit's float32 result. Configs
cover gradients, filters, slices and each method's own switches.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.merge_parity import home, models  # noqa: F401  (module fixtures)
from tests.merge_parity import (fill, max_abs_diff, max_bf16_ulps, mergekit_merge,
                                mergepipe_merge, state)

T_FILTERS = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
             {"value": 0.5}]


def _models(*entries: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    return [{"model": f"@{n}", **({"parameters": p} if p is not None else {})} for n, p in entries]


CONFIGS: dict[str, dict[str, Any]] = {
    "linear": {
        "merge_method": "linear",
        "models": _models(("e1", {"weight": 0.6}), ("e2", {"weight": [0.1, 0.9]}),
                          ("e3", {"weight": 0.2})),
    },
    "linear_with_base_and_no_normalize": {  # the base is one more input (global weight)
        "merge_method": "linear", "base_model": "@base",
        "models": _models(("e1", {"weight": 0.6}), ("e2", {"weight": 0.3})),
        "parameters": {"weight": 0.1, "normalize": False},
    },
    "slerp": {
        "merge_method": "slerp", "base_model": "@e1",
        "models": _models(("e1", None), ("e2", None)),
        "parameters": {"t": T_FILTERS},
    },
    "slerp_slices": {  # the classic layer_range form
        "merge_method": "slerp", "base_model": "@e1",
        "slices": [{"sources": [{"model": "@e1", "layer_range": [0, 4]},
                                {"model": "@e2", "layer_range": [0, 4]}]}],
        "parameters": {"t": T_FILTERS},
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "models": _models(("e1", {"weight": 0.7}), ("e2", {"weight": 0.3})),
    },
    "nuslerp_task_vectors_by_row": {
        "merge_method": "nuslerp", "base_model": "@base",
        "models": _models(("e1", {"weight": 0.4}), ("e2", {"weight": [0.2, 0.8]})),
        "parameters": {"nuslerp_flatten": False},
    },
    "nuslerp_row_wise": {
        "merge_method": "nuslerp", "base_model": "@base",
        "models": _models(("e1", {"weight": 0.4}), ("e2", {"weight": 0.6})),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic", "base_model": "@base",
        "models": _models(("e1", {"weight": [0.2, 1.0]}),
                          ("e2", {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.3}]})),
        "parameters": {"lambda": 0.8},
    },
    "ties": {  # mergekit's README example, base listed among the models
        "merge_method": "ties", "base_model": "@base",
        "models": _models(("base", None),
                          ("e1", {"density": [1, 0.7, 0.1], "weight": 1.0}),
                          ("e2", {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}),
                          ("e3", {"density": 0.33,
                                  "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]})),
        "parameters": {"normalize": True, "int8_mask": True},
    },
    "ties_unnormalized": {
        "merge_method": "ties", "base_model": "@base",
        "models": _models(("c1", {"density": 0.4, "weight": 0.6}),
                          ("c2", {"density": 0.6, "weight": 0.5})),
        "parameters": {"normalize": False, "lambda": 1.3},
    },
    "ties_rescaled": {
        "merge_method": "ties", "base_model": "@base",
        "models": _models(("c1", {"density": 0.3, "weight": 0.6}),
                          ("c2", {"density": 0.7, "weight": 0.5})),
        "parameters": {"rescale": True},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs", "base_model": "@base",
        "models": _models(("e1", {"weight": 0.5, "density": 0.8, "gamma": 0.05}),
                          ("e2", {"weight": 0.5, "density": 0.6})),
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties", "base_model": "@base",
        "models": _models(("e1", {"weight": 0.7, "density": 0.9, "gamma": 0.02}),
                          ("e2", {"weight": 0.5, "density": 0.5, "gamma": 0.1})),
        "parameters": {"normalize": True},
    },
    "model_stock": {
        "merge_method": "model_stock", "base_model": "@base",
        "models": _models(("c1", None), ("c2", None), ("c3", None)),
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock", "base_model": "@base",
        "models": _models(("c1", None), ("c2", None)),
        "parameters": {"filter_wise": True},
    },
    "passthrough_frankenmerge": {  # 6 layers from two models
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "@e1", "layer_range": [0, 3]}]},
                   {"sources": [{"model": "@e2", "layer_range": [1, 4]}]}],
    },
    "passthrough_scaled": {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "@e1", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "@e2", "layer_range": [2, 4]}],
                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                             {"filter": "down_proj", "value": 0.5},
                                             {"value": 1.0}]}}],
    },
    "task_arithmetic_slices": {  # precedence: source > slice > global; t per slice
        "merge_method": "task_arithmetic", "base_model": "@base",
        "slices": [
            {"sources": [{"model": "@base", "layer_range": [0, 2]},
                         {"model": "@e1", "layer_range": [0, 2],
                          "parameters": {"weight": [0.1, 0.9]}}]},
            {"sources": [{"model": "@base", "layer_range": [1, 4]},
                         {"model": "@e2", "layer_range": [1, 4]}],
             "parameters": {"weight": [1.0, 0.0]}},
            {"sources": [{"model": "@base", "layer_range": [3, 4]},
                         {"model": "@e3", "layer_range": [3, 4]}],
             "parameters": {"weight": [0.2, 0.6]}}],
        "parameters": {"weight": 0.5},
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": _models(("e1", {"weight": 0.5}), ("e2", {"weight": [0.2, 0.6]}),
                          ("e3", {"weight": 0.3})),
    },
    "multislerp_task_vectors": {
        "merge_method": "multislerp", "base_model": "@base",
        "models": _models(("c1", {"weight": 2.0}), ("c2", {"weight": 1.0}),
                          ("c3", {"weight": 0.5})),
        "parameters": {"normalize_weights": True},
    },
    "karcher": {
        "merge_method": "karcher",
        "models": _models(("c1", None), ("c2", None), ("c3", None)),
        "parameters": {"max_iter": 20},
    },
    "sce": {
        "merge_method": "sce", "base_model": "@base",
        "models": _models(("c1", None), ("c2", None), ("e1", None)),
    },
    "sce_selected": {
        "merge_method": "sce", "base_model": "@base",
        "models": _models(("c1", None), ("c2", None), ("c3", None)),
        "parameters": {"select_topk": [0.3, 0.8]},
    },
    "nearswap": {
        "merge_method": "nearswap", "base_model": "@base",
        "models": _models(("e1", None)),
        "parameters": {"t": [0.005, 0.02]},
    },
    "arcee_fusion": {  # tensors below 10**6 entries: no sampling, so deterministic
        "merge_method": "arcee_fusion", "base_model": "@base",
        "models": _models(("e2", None)),
    },
}
METHOD_OF = {name: cfg["merge_method"] for name, cfg in CONFIGS.items()}


def test_every_deterministic_method_is_covered():
    """Each registered method that draws no random numbers has a parity config here."""
    from mergepipe.methods.base import all_methods
    methods = all_methods()
    deterministic = {name for name, m in methods.items() if not m.stochastic}
    assert deterministic <= set(METHOD_OF.values()) <= set(methods)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_mergekit(name, models, home, tmp_path, tmp_path_factory):
    cfg = fill({**CONFIGS[name], "dtype": "float32"}, models)
    theirs = state(mergekit_merge(cfg, tmp_path_factory.getbasetemp()))
    ours = state(mergepipe_merge(cfg, home, tmp_path / "f32"))
    diff = max_abs_diff(ours, theirs)
    ours_bf16 = state(mergepipe_merge({**cfg, "out_dtype": "bfloat16"}, home, tmp_path / "bf16"))
    ulps = max_bf16_ulps(ours_bf16, theirs)
    print(f"\nparity {name}: float32 max abs diff {diff:.3g}, bfloat16 {ulps:.3g} ulp")
    assert diff == 0
    assert ulps <= 1.0
    base = state(models["base"])
    moved = max((theirs[k] - base[k]).abs().max().item() for k in theirs if k in base)
    assert moved > 1e-3  # the merge did something: equality is not trivial


def test_frankenmerge_output_has_the_stacked_layer_count(models, home, tmp_path):
    from transformers import AutoConfig
    out = mergepipe_merge(fill(CONFIGS["passthrough_frankenmerge"], models), home,
                          tmp_path / "out")
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 6
    sd = state(out)
    e1, e2 = state(models["e1"]), state(models["e2"])
    # output layer 3 is e2's layer 1; layer 2 is e1's layer 2
    assert torch.equal(sd["model.layers.3.mlp.up_proj.weight"], e2["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], e1["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], e1["model.embed_tokens.weight"])
    assert torch.equal(sd["lm_head.weight"], e2["lm_head.weight"])


def _plan(models: dict[str, Path], home: Path, cfg: dict[str, Any]):
    from mergepipe import api
    with api.open_catalog(home) as cat:
        return api.build_plan(cat, fill(cfg, models), store=False)


def test_plan_reads_what_the_method_declares(models, home):
    """passthrough reads one model, slerp two; nothing in the planner names them."""
    frank = _plan(models, home, CONFIGS["passthrough_frankenmerge"])
    assert all(t.base is None and len(t.inputs) == 1 for t in frank.tasks)
    assert frank.est_bytes()["base"] == 0
    slerp = _plan(models, home, CONFIGS["slerp"])
    assert [s.role for s in slerp.sources] == ["base", "expert"]
    assert all(t.base is not None and len(t.inputs) == 1 for t in slerp.tasks)
    stock = _plan(models, home, CONFIGS["model_stock"])
    assert all(len(t.inputs) == 3 and t.scope == "tensor" for t in stock.tasks)


def test_a_new_method_is_one_registry_entry(models, home, tmp_path, monkeypatch):
    """A method registered from outside the package plans and runs with no planner change."""
    from mergepipe.methods import base as registry
    from mergepipe.methods.base import MergeMethod, register

    # register into a copy of the registry that monkeypatch puts back afterwards
    monkeypatch.setattr(registry, "_REGISTRY", registry.all_methods())

    def negate_delta(ctx, base, tensors, params):
        return base - params["weight"][0] * (tensors[0] - base)

    register(MergeMethod(name="test_negate_delta", fn=negate_delta,
                         model_params={"weight": 1.0}, max_models=1))
    cfg = {"merge_method": "test_negate_delta", "base_model": "@base",
           "models": [{"model": "@e1", "parameters": {"weight": 0.5}}], "dtype": "float32"}
    out = state(mergepipe_merge(fill(cfg, models), home, tmp_path / "out"))
    base, e1 = state(models["base"]), state(models["e1"])
    for k in base:
        torch.testing.assert_close(out[k], base[k] - 0.5 * (e1[k] - base[k]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, Path]:
    """Inputs stored in bf16 across several shards: equal magnitudes are common."""
    from tests.conftest import make_llama
    root = tmp_path_factory.mktemp("sharded")
    base = make_llama(root / "sh-base", 30, dtype=torch.bfloat16, shard="60KB")
    return {"base": base,
            "a": make_llama(root / "sh-a", 31, dtype=torch.bfloat16, base=base, shard="60KB"),
            "b": make_llama(root / "sh-b", 32, dtype=torch.bfloat16, base=base, shard="60KB")}


def test_sharded_bfloat16_frankenmerge_matches_mergekit(sharded, home, tmp_path,
                                                       tmp_path_factory):
    assert len(list(sharded["a"].glob("*.safetensors"))) > 1
    cfg = fill({"merge_method": "passthrough", "dtype": "float32",
                "slices": [{"sources": [{"model": "@a", "layer_range": [0, 3]}]},
                           {"sources": [{"model": "@b", "layer_range": [2, 4]}]}]}, sharded)
    theirs = state(mergekit_merge(cfg, tmp_path_factory.getbasetemp()))
    ours = state(mergepipe_merge(cfg, home, tmp_path / "out"))
    assert max_abs_diff(ours, theirs) == 0


TIES_DENSITY = {"a": 0.5, "b": 0.3}


def test_ties_on_bfloat16_inputs_differs_from_mergekit_only_in_tie_order(
        sharded, home, tmp_path, tmp_path_factory):
    """With equal magnitudes at the threshold, which of them TIES keeps is a tie rule.

    MergePipe keeps the earliest (flat index) — a stable sort's order, which a
    streaming selection can reproduce; mergekit keeps whichever its unstable
    argsort puts first. So: exactly mergekit's output when mergekit sorts
    stably, and equal to plain mergekit everywhere except where an input's
    |delta| equals its threshold.
    """
    cfg = fill({"merge_method": "ties", "base_model": "@base", "dtype": "float32",
                "models": _models(("a", {"weight": 1.0, "density": TIES_DENSITY["a"]}),
                                  ("b", {"weight": [0.5, 1.0], "density": TIES_DENSITY["b"]}))},
               sharded)
    root = tmp_path_factory.getbasetemp()
    ours = state(mergepipe_merge(cfg, home, tmp_path / "out"))
    assert max_abs_diff(ours, state(mergekit_merge(cfg, root, stable_sort=True))) == 0
    theirs = state(mergekit_merge(cfg, root))
    base = state(sharded["base"])
    inputs = {k: state(sharded[k]) for k in TIES_DENSITY}
    tied_at_threshold = 0
    for name in ours:
        ties = torch.zeros(ours[name].shape, dtype=torch.bool)
        for k, density in TIES_DENSITY.items():
            mag = (inputs[k][name].float() - base[name].float()).abs()
            kth = mag.reshape(-1).topk(max(1, int(density * mag.numel()))).values[-1]
            ties |= mag == kth
            tied_at_threshold += int((mag == kth).sum()) > 1
        differs = ours[name] != theirs[name]
        assert not (differs & ~ties).any(), name
    assert tied_at_threshold > 0  # the inputs do have ties at the threshold

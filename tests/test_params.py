"""Per-layer parameters as mergekit reads them, checked against hand-computed merges.

All merges are task arithmetic on the 4-layer family, so the expected output
of a tensor is base + w·(expert − base) with w worked out by hand below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import write_spec
from tests.merge_parity import home  # noqa: F401  (module fixture)
from tests.merge_parity import fill, mergepipe_merge, state

LAYERS = 4


@pytest.fixture(scope="module")
def sd(tiny_family) -> dict[str, dict[str, torch.Tensor]]:
    return {k: state(v) for k, v in tiny_family.items()}


def merge(tiny_family, home: Path, out: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    return state(mergepipe_merge(fill({"merge_method": "task_arithmetic", "base_model": "@base",
                                       "dtype": "float32", **cfg}, tiny_family), home, out))


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def check(out: dict[str, torch.Tensor], sd: dict[str, dict[str, torch.Tensor]],
          weight_of, expert: str = "e1") -> None:
    """Every output tensor equals base + w·(expert − base) with w = weight_of(name)."""
    base, x = sd["base"], sd[expert]
    assert set(out) == set(base)
    for k in base:
        w = weight_of(k)
        expected = base[k] + w * (x[k] - base[k])
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6, msg=f"{k} (w={w})")


def test_gradient_is_interpolated_over_layers_and_outside_layers_takes_the_first_value(
        tiny_family, home, sd, tmp_path):
    # three anchors over four layers: t = 0, 1/3, 2/3, 1 → position t·2 between anchors
    out = merge(tiny_family, home, tmp_path / "o",
                {"models": [{"model": "@e1", "parameters": {"weight": [0.0, 1.0, 0.4]}}]})
    by_layer = {0: 0.0, 1: 2 / 3, 2: 1.0 + (0.4 - 1.0) / 3, 3: 0.4}
    check(out, sd, lambda k: 0.0 if layer_of(k) is None else by_layer[layer_of(k)])


def test_first_matching_filter_wins_and_values_may_be_gradients(tiny_family, home, sd, tmp_path):
    weight = [{"filter": "layers.1.", "value": 0.9},
              {"filter": "mlp", "value": 0.5},
              {"filter": "self_attn", "value": [0.0, 1.0]},
              {"value": 0.1}]
    out = merge(tiny_family, home, tmp_path / "o",
                {"models": [{"model": "@e1", "parameters": {"weight": weight}}]})

    def w(k: str) -> float:
        if "layers.1." in k:
            return 0.9
        if "mlp" in k:
            return 0.5
        if "self_attn" in k:
            return layer_of(k) / (LAYERS - 1)
        return 0.1
    check(out, sd, w)


def test_per_layer_vector_with_default_and_with_fallthrough(tiny_family, home, sd, tmp_path):
    vec = [0.1, 0.2, 0.3, 0.4]
    out = merge(tiny_family, home, tmp_path / "a", {"models": [
        {"model": "@e1", "parameters": {"weight": {"layers": vec, "default": 0.7}}}]})
    check(out, sd, lambda k: 0.7 if layer_of(k) is None else vec[layer_of(k)])
    # without a default, tensors outside layers fall through to the spec's parameters
    out = merge(tiny_family, home, tmp_path / "b", {
        "models": [{"model": "@e1", "parameters": {"weight": {"layers": vec}}}],
        "parameters": {"weight": 0.25}})
    check(out, sd, lambda k: 0.25 if layer_of(k) is None else vec[layer_of(k)])


def _src(model: str, a: int, b: int, **params: Any) -> dict[str, Any]:
    return {"model": model, "layer_range": [a, b], **({"parameters": params} if params else {})}


def test_model_parameters_beat_slice_parameters_beat_global_ones(tiny_family, home, sd, tmp_path):
    out = merge(tiny_family, home, tmp_path / "o", {
        "slices": [
            {"sources": [_src("@base", 0, 2), _src("@e1", 0, 2, weight=0.9)],
             "parameters": {"weight": 0.5}},
            {"sources": [_src("@base", 2, 4), _src("@e1", 2, 4)],
             "parameters": {"weight": 0.5}},
            {"sources": [_src("@base", 0, 1), _src("@e2", 0, 1)]}],
        "parameters": {"weight": 0.2}})
    base, e1, e2 = sd["base"], sd["e1"], sd["e2"]
    assert sum(1 for k in out if layer_of(k) is not None) == 5 * 9  # 2 + 2 + 1 layers

    def expect(k: str) -> torch.Tensor:
        layer = layer_of(k)
        if layer is None:
            # embeddings from the first slice (e1, its own 0.9); norm and head from the last (e2)
            return base[k] + 0.9 * (e1[k] - base[k]) if "embed" in k else \
                base[k] + 0.2 * (e2[k] - base[k])
        src_name = lambda i: k.replace(f"layers.{layer}.", f"layers.{i}.")  # noqa: E731
        if layer < 2:
            b, x, w = base[src_name(layer)], e1[src_name(layer)], 0.9
        elif layer < 4:
            b, x, w = base[src_name(layer)], e1[src_name(layer)], 0.5
        else:
            b, x, w = base[src_name(0)], e2[src_name(0)], 0.2
        return b + w * (x - b)
    for k in out:
        torch.testing.assert_close(out[k], expect(k), rtol=0, atol=1e-6, msg=k)


def test_gradient_restarts_in_every_slice_and_a_one_layer_slice_takes_the_last_value(
        tiny_family, home, sd, tmp_path):
    out = merge(tiny_family, home, tmp_path / "o", {
        "slices": [{"sources": [_src("@base", 0, 2), _src("@e1", 0, 2)]},
                   {"sources": [_src("@base", 2, 4), _src("@e1", 2, 4)]},
                   {"sources": [_src("@base", 1, 2), _src("@e1", 1, 2)]}],
        "parameters": {"weight": [0.0, 1.0]}})
    # output layers 0..4 come from input layers 0, 1, 2, 3, 1 with t = 0, 1, 0, 1, 1
    src_layer, weight = [0, 1, 2, 3, 1], [0.0, 1.0, 0.0, 1.0, 1.0]
    base, e1 = sd["base"], sd["e1"]
    for k in out:
        layer = layer_of(k)
        if layer is None:
            b, x, w = base[k], e1[k], 0.0
        else:
            src = k.replace(f"layers.{layer}.", f"layers.{src_layer[layer]}.")
            b, x, w = base[src], e1[src], weight[layer]
        torch.testing.assert_close(out[k], b + w * (x - b), rtol=0, atol=1e-6, msg=k)


def test_model_filters_see_input_names_and_merge_filters_see_output_names(
        tiny_family, home, sd, tmp_path):
    """As in mergekit: a model's filters match its own tensor names (layers 2–3 here),
    merge-wide filters match the output names (renumbered 0–1)."""
    out = merge(tiny_family, home, tmp_path / "o", {
        "slices": [{"sources": [
            _src("@base", 2, 4),
            _src("@e1", 2, 4, weight=[{"filter": "layers.2.", "value": 1.0}, {"value": 0.3}])]}],
        "parameters": {"lambda": [{"filter": "layers.0.", "value": 0.5}, {"value": 1.0}]}})
    base, e1 = sd["base"], sd["e1"]
    for k in out:
        layer = layer_of(k)
        if layer is None:
            continue
        src = k.replace(f"layers.{layer}.", f"layers.{layer + 2}.")
        w = 1.0 if layer == 0 else 0.3
        lam = 0.5 if layer == 0 else 1.0
        expected = base[src] + lam * (w * (e1[src] - base[src]))
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6, msg=k)


ONE_EXPERT = "models:\n  - model: {e1}\n    parameters: {{weight: 1}}\n"
BAD = {  # body after "merge_method: ties / base_model: ..."; what the error must name
    "modules_section": (ONE_EXPERT + "modules: {{}}\n", "'modules' is not supported"),
    "unknown_top_key": (ONE_EXPERT + "merge_optoins: {{}}\n", "unknown spec key 'merge_optoins'"),
    "tokenizer_union": (ONE_EXPERT + "tokenizer_source: union\n", "tokenizer_source 'union'"),
    "global_param_on_a_model": (
        "models:\n  - model: {e1}\n    parameters: {{weight: 1, normalize: true}}\n",
        "'normalize' applies to the whole merge"),
    "other_methods_param": (
        "models:\n  - model: {e1}\n    parameters: {{weight: 1, gamma: 0.1}}\n",
        "unknown parameter 'gamma'"),
    "base_with_parameters": (
        "models:\n  - model: {base}\n    parameters: {{weight: 0.3}}\n" + ONE_EXPERT[8:],
        "is the base model; its parameters (weight)"),
    "residual_weight": (
        "slices:\n  - sources:\n      - {{model: {base}, layer_range: [0, 4]}}\n"
        "      - {{model: {e1}, layer_range: [0, 4]}}\n    residual_weight: 0.5\n"
        "parameters: {{weight: 1}}\n", "unsupported key 'residual_weight'"),
    "layer_range_outside_model": (
        "slices:\n  - sources:\n      - {{model: {base}, layer_range: [0, 6]}}\n"
        "      - {{model: {e1}, layer_range: [0, 6]}}\nparameters: {{weight: 1}}\n",
        "is outside"),
    "not_a_boolean": (ONE_EXPERT + "parameters: {{normalize: maybe}}\n",
                      "expected true or false, got 'maybe'"),
    "nested_filters": (
        "models:\n  - model: {e1}\n    parameters:\n      weight:\n"
        "        - filter: mlp\n          value: [{{filter: up, value: 1}}]\n",
        "a filter's value must be a number or a list of numbers"),
}


def assert_refused(cli, tmp_path: Path, text: str, needle: str) -> None:
    """`mergepipe apply` fails: nonzero exit, one `error:` line naming it, no output."""
    res = cli("apply", write_spec(tmp_path / "spec.yml", text), "--out", tmp_path / "out",
              ok=False)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsupported_yaml_is_refused_with_one_line_naming_it(case, cli, tiny_family, tmp_path):
    body, needle = BAD[case]
    text = "merge_method: ties\nbase_model: {base}\n".format(**tiny_family) + \
        body.format(**tiny_family)
    assert_refused(cli, tmp_path, text, needle)


@pytest.mark.parametrize("method,body,needle", [
    ("slerp", "models:\n  - model: {e1}\n", "parameter 't' is missing"),
    ("passthrough", "models:\n  - model: {e1}\n  - model: {e2}\n", "takes at most 1 models"),
    ("model_stock", "base_model: {base}\nmodels:\n  - model: {e1}\n",
     "needs at least 2 models besides the base"),
    ("della", "base_model: {base}\nmodels:\n  - model: {e1}\n    parameters: {{weight: 1, density: 0.1}}\n",
     "density 0.1 ± epsilon 0.15 must stay inside (0, 1)"),
    ("slerp", "base_model: {base}\nslices:\n  - sources:\n      - {{model: {e1}, layer_range: [0, 4]}}\n"
              "      - {{model: {e2}, layer_range: [0, 4]}}\nparameters: {{t: 0.5}}\n",
     "is not among the slice's sources"),
])
def test_method_requirements_are_explained(method, body, needle, cli, tiny_family, tmp_path):
    text = f"merge_method: {method}\n" + body.format(**tiny_family)
    if method == "slerp" and "base_model" not in text:
        text = text.replace("models:", f"base_model: {tiny_family['base']}\nmodels:")
    assert_refused(cli, tmp_path, text, needle)

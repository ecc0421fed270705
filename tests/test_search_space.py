"""Layer-wise candidates reach exactly their own layers' tensors, through the real engine."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import make_llama
from mergepipe import api
from mergepipe.catalog.names import layer_of
from mergepipe.catalog.store import open_catalog
from mergepipe.search.space import LayerSpace

LAYERS = 14


@pytest.fixture(scope="module")
def deep_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    base = make_llama(root / "base", 0, layers=LAYERS, hidden=16)
    reasoning = make_llama(root / "reasoning", 1, layers=LAYERS, hidden=16, base=base, scale=0.1)
    return base, reasoning


def _merge(tmp_path, base, reasoning, space, x):
    with open_catalog(tmp_path / "ws") as cat:
        api.register(cat, base, name="base")
        api.register(cat, reasoning, name="reasoning")
        plan = api.build_plan(cat, space.to_spec(x, "base", "reasoning"))
        res = api.apply_plan(cat, plan, tmp_path / "out")
    return load_file(str(tmp_path / "out" / "model.safetensors")) if (
        tmp_path / "out" / "model.safetensors").exists() else _load_sharded(res.out)


def _load_sharded(out):
    import glob
    tensors = {}
    for f in sorted(glob.glob(f"{out}/*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_coefficient_of_layer_12_reaches_only_layer_12(tmp_path, deep_pair):
    base, reasoning = deep_pair
    space = LayerSpace(LAYERS)
    x = [0.0] * space.dim
    x[12] = 1.0
    merged = _merge(tmp_path, base, reasoning, space, x)
    wb, wr = load_file(str(base / "model.safetensors")), load_file(str(reasoning / "model.safetensors"))
    touched = set()
    for name, t in merged.items():
        if layer_of(name) == 12:
            assert t.equal(wr[name]), name
            touched.add(name)
        else:
            assert t.equal(wb[name]), f"{name} moved although only layer 12 had weight"
    assert touched and all(".layers.12." in n for n in touched)


def test_grouped_coefficients_and_head_expand_to_their_layers(tmp_path, deep_pair):
    space = LayerSpace(LAYERS, group_size=4)
    assert space.dim == 5 and space.groups()[-1] == [12, 13]
    layers, head = space.layer_weights([0.1, 0.2, 0.3, 0.4, 0.9])
    assert layers[0:4] == [0.1] * 4 and layers[12:] == [0.4, 0.4] and head == 0.9
    base, reasoning = deep_pair
    merged = _merge(tmp_path, base, reasoning, space, [0, 0, 0, 0.5, 1.0])
    wb, wr = load_file(str(base / "model.safetensors")), load_file(str(reasoning / "model.safetensors"))
    for name, t in merged.items():
        layer = layer_of(name)
        w = 1.0 if layer is None else (0.5 if layer >= 12 else 0.0)
        assert t.allclose(wb[name] + w * (wr[name] - wb[name]), atol=1e-6), name

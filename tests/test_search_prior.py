"""Layer prior math, and that probe prompts come from the training split only."""
from __future__ import annotations

import json

import pytest
import torch

from mergepipe.errors import MergePipeError
from mergepipe.search.prior import (LayerPrior, combine, lengthscales_from_importance,
                                    robust_normalise, smooth)
from mergepipe.search.source_diff import param_diff_from_checkpoints, probe_prompts
from mergepipe.search.space import LayerSpace


def test_robust_normalise_is_median_centred_and_outlier_proof():
    v = robust_normalise([1.0, 2.0, 3.0, 4.0, 1000.0])
    assert v[2] == pytest.approx(0.5)
    assert v[0] < v[1] < v[2] < v[3] < v[4] <= 1.0
    assert v[3] < 0.9  # the outlier does not squash the others together


def test_smoothing_spreads_to_neighbours_and_keeps_constants():
    assert smooth([0.0, 1.0, 0.0]) == pytest.approx([0.25, 0.5, 0.25])
    assert smooth([0.3] * 4) == pytest.approx([0.3] * 4)


def test_combined_importance_is_clipped_and_head_is_not_smoothed():
    layers, head = combine([0, 0, 0, 10, 0], [0, 0, 0, 10, 0])
    assert all(0.05 <= v <= 1.0 for v in layers + [head])
    assert max(range(4), key=lambda i: layers[i]) == 3
    assert layers[2] > layers[0]           # smoothing leaks into the neighbour


def test_lengthscales_follow_importance_rank_tiers():
    imp = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.4, 0.6, 0.8, 0.05]
    ls = lengthscales_from_importance(imp)
    assert ls[0] == 0.5 and ls[8] == 0.5          # top 15% of 10 → ranks 0, 1
    assert ls[4] == 1.0 and ls[7] == 1.0          # up to 40%
    assert ls[2] == 2.0 and ls[6] == 2.0 and ls[3] == 2.0
    assert ls[9] == 5.0 and ls[1] == 5.0


def test_prior_round_trips_and_reduces_per_group():
    p = LayerPrior([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], 0.05, 0.5)
    q = LayerPrior.from_json(json.loads(json.dumps(p.to_json())))
    assert q.importance_layers == pytest.approx(p.importance_layers)
    space = LayerSpace(4, group_size=2)
    red = space.reduce_per_layer(p.importance_layers, p.importance_head)
    assert len(red) == 3
    assert red[0] == pytest.approx(sum(p.importance_layers[:2]) / 2)


def test_probe_prompts_refuse_the_evaluation_split(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n"
                             for i in range(5)))
    test.write_text(json.dumps({"prompt": "Q: 9-1\nA:", "answer": "8"}) + "\n")
    assert probe_prompts(train, 3, exclude=[test]) == [f"Q: {i}+1\nA:" for i in range(3)]
    with pytest.raises(MergePipeError, match="training split"):
        probe_prompts(test, 3, exclude=[test])


def _base_and_moved(tmp_path, layers: int, seed: int, scale):
    """Two identical tiny checkpoints, then Gaussian noise of `scale(name)` added to the second."""
    from conftest import make_llama
    from safetensors.torch import load_file, save_file
    base = make_llama(tmp_path / "base", 0, layers=layers, hidden=32)
    moved = make_llama(tmp_path / "moved", 0, layers=layers, hidden=32)
    f = moved / "model.safetensors"
    tensors = load_file(str(f))
    torch.manual_seed(seed)
    for name in tensors:
        tensors[name] = tensors[name] + scale(name) * torch.randn_like(tensors[name])
    save_file(tensors, str(f), metadata={"format": "pt"})
    return base, moved


def test_measured_differences_grow_where_the_expert_moved(tmp_path):
    """A reasoning model that differs from the base only in layer 2 shows it in both signals."""
    base, moved = _base_and_moved(tmp_path, 4, seed=1,
                                  scale=lambda name: 0.5 if ".layers.2." in name else 0.0)
    per_layer, head = param_diff_from_checkpoints(base, moved, 4)
    assert per_layer[2] > 0.1 and per_layer[0] == per_layer[1] == per_layer[3] == 0.0
    assert head == 0.0


def test_parameter_prior_comes_from_block_statistics_when_analysed(tmp_path):
    """Before `analyze` there are no statistics (the prior reads the checkpoints); after it,
    the per-layer differences from the catalog equal those computed from the files."""
    from mergepipe import api
    from mergepipe.runs.analyze import analyze
    from mergepipe.search.source_diff import param_diff_from_stats
    base, moved = _base_and_moved(tmp_path, 3, seed=2,
                                  scale=lambda name: 0.3 if ".layers.1." in name else 0.01)
    with api.open_catalog(tmp_path / "ws") as cat:
        b = api.register(cat, base, name="base")
        r = api.register(cat, moved, name="moved")
        assert param_diff_from_stats(cat, r["model_id"], b["model_id"], 3) is None
        analyze(cat, [cat.require_model("moved")], cat.require_model("base"), block_bytes=4096)
        per_layer, head = param_diff_from_stats(cat, r["model_id"], b["model_id"], 3)
    files_per_layer, files_head = param_diff_from_checkpoints(base, moved, 3)
    assert per_layer == pytest.approx(files_per_layer, rel=1e-4)
    assert head == pytest.approx(files_head, rel=1e-4)
    assert per_layer[1] > 10 * max(per_layer[0], per_layer[2])

"""DARE and DELLA: right statistics, and the same bytes every time.

mergekit draws its masks from the global torch generator, so its outputs can
only be compared in distribution; MergePipe seeds a generator per (seed,
tensor, model), so its outputs must be byte-identical across runs, thread
counts and the order in which tensors are merged.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import make_llama
from tests.merge_parity import home, models  # noqa: F401  (module fixtures)
from tests.merge_parity import (fill, mergekit_merge, mergepipe_execute, mergepipe_merge,
                                signed_gap, state)

REPO = Path(__file__).resolve().parents[1]
DENSITY = 0.3


def one_expert(method: str, **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": "@base", "dtype": "float32",
            "models": [{"model": "@e1", "parameters": {"weight": 1.0, "density": DENSITY,
                                                        **params}}],
            "parameters": {"rescale": False}}


@pytest.mark.parametrize("method,extra", [("dare_linear", {}),
                                          ("della_linear", {"epsilon": 0.1})])
def test_kept_fraction_is_within_three_standard_errors_of_density(method, extra, models, home,
                                                                  tmp_path):
    out = state(mergepipe_merge(fill(one_expert(method, **extra), models), home, tmp_path / "o"))
    base, e1 = state(models["base"]), state(models["e1"])
    kept = torch.cat([(out[k] != base[k]).reshape(-1) for k in base]).double()
    n = kept.numel()
    se = (DENSITY * (1 - DENSITY) / n) ** 0.5
    assert abs(kept.mean().item() - DENSITY) <= 3 * se, (kept.mean().item(), se)
    # what is kept is the expert's value, unscaled (rescale off)
    for k in base:
        mask = out[k] != base[k]
        torch.testing.assert_close(out[k][mask], e1[k][mask], rtol=0, atol=1e-6)


def test_della_keeps_large_deltas_more_often(models, home, tmp_path):
    """DELLA's keep probability ramps with magnitude rank: density ± epsilon."""
    eps = 0.2
    out = state(mergepipe_merge(fill(one_expert("della_linear", epsilon=eps), models), home,
                                tmp_path / "o"))
    base, e1 = state(models["base"]), state(models["e1"])
    big, small = [], []
    for k in base:
        delta = (e1[k] - base[k]).reshape(1, -1) if e1[k].dim() < 2 else e1[k] - base[k]
        kept = (out[k] != base[k]).reshape(delta.shape)
        rank = delta.abs().argsort(dim=1).argsort(dim=1)
        upper = rank >= delta.shape[1] // 2
        big.append(kept[upper].double())
        small.append(kept[~upper].double())
    big_rate, small_rate = torch.cat(big).mean().item(), torch.cat(small).mean().item()
    n = torch.cat(big).numel()
    se = (0.25 / n) ** 0.5
    # expected: density + eps/2 for the upper half, density − eps/2 for the lower half
    assert abs(big_rate - (DENSITY + eps / 2)) <= 3 * se
    assert abs(small_rate - (DENSITY - eps / 2)) <= 3 * se


TWO_EXPERTS = {
    "dare_linear": {},
    "dare_ties": {},
    "della": {"epsilon": 0.1},
    "della_linear": {"epsilon": 0.1},
}


@pytest.mark.parametrize("method", sorted(TWO_EXPERTS))
def test_mean_delta_matches_mergekit_in_expectation(method, models, home, tmp_path,
                                                    tmp_path_factory):
    extra = TWO_EXPERTS[method]
    cfg = fill({"merge_method": method, "base_model": "@base", "dtype": "float32",
                "models": [{"model": "@c1", "parameters": {"weight": 0.7, "density": 0.5, **extra}},
                           {"model": "@c2", "parameters": {"weight": 0.5, "density": 0.4, **extra}}]},
               models)
    theirs = state(mergekit_merge(cfg, tmp_path_factory.getbasetemp(), seed=1234))
    ours = state(mergepipe_merge(cfg, home, tmp_path / "o", seed=1234))
    base, c1, c2 = (state(models[k]) for k in ("base", "c1", "c2"))
    dense = {k: 0.7 * (c1[k] - base[k]) + 0.5 * (c2[k] - base[k]) for k in base}
    gap, se = signed_gap(ours, theirs, base, dense)
    assert abs(gap) <= 3 * se, (gap, se)
    # and both moved along the dense merge by a comparable amount (not trivially 0 = 0)
    along = torch.cat([((ours[k] - base[k]) * dense[k].sign()).reshape(-1) for k in base])
    assert along.mean().item() > 50 * se


def sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


STOCHASTIC = {"merge_method": "dare_ties", "base_model": "@base", "dtype": "float32",
              "models": [{"model": "@c1", "parameters": {"weight": 0.6, "density": 0.4}},
                         {"model": "@c2", "parameters": {"weight": 0.5, "density": 0.6}}]}
STOCHASTIC_DELLA = {**STOCHASTIC, "merge_method": "della",
                    "parameters": {"epsilon": 0.1, "lambda": 0.9}}


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    """Tensors above torch's parallel grain (32768 elements), so threads really split work."""
    root = tmp_path_factory.mktemp("wide")
    base = make_llama(root / "wide-base", 20, layers=1, hidden=192, vocab=256)
    return {"base": base, "c1": make_llama(root / "w1", 21, layers=1, hidden=192, vocab=256,
                                           base=base),
            "c2": make_llama(root / "w2", 22, layers=1, hidden=192, vocab=256, base=base)}


@pytest.mark.parametrize("cfg", [STOCHASTIC, STOCHASTIC_DELLA], ids=["dare_ties", "della"])
def test_identical_bytes_across_runs_and_different_with_another_seed(cfg, models, home,
                                                                    tmp_path):
    spec = fill(cfg, models)
    a = mergepipe_merge(spec, home, tmp_path / "a", seed=7)
    b = mergepipe_execute(spec, home, tmp_path / "b", seed=7)
    c = mergepipe_execute(spec, home, tmp_path / "c", seed=8)
    assert sha(a) == sha(b)
    assert sha(a) != sha(c)


THREAD_SCRIPT = """
import sys, json, torch
torch.set_num_threads(int(sys.argv[1]))
from pathlib import Path
from tests.merge_parity import mergepipe_execute
for i, spec in enumerate(json.loads(sys.argv[2])):
    mergepipe_execute(spec, Path(sys.argv[3]), Path(sys.argv[4]) / str(i), seed=7)
print(torch.get_num_threads())
"""
# whole-tensor reductions (L1 rescale, norms, dot products, thresholds) in every family
THREAD_SPECS = [
    STOCHASTIC, STOCHASTIC_DELLA,
    {**STOCHASTIC, "merge_method": "ties", "parameters": {"rescale": True}},
    {"merge_method": "slerp", "base_model": "@c1", "dtype": "float32",
     "models": ["@c1", "@c2"], "parameters": {"t": 0.3}},
    {"merge_method": "nuslerp", "base_model": "@base", "dtype": "float32",
     "models": [{"model": "@c1", "parameters": {"weight": 0.3}},
                {"model": "@c2", "parameters": {"weight": 0.7}}]},
    {"merge_method": "model_stock", "base_model": "@base", "dtype": "float32",
     "models": ["@c1", "@c2"]},
]


def test_identical_bytes_with_one_and_two_threads(wide, home, tmp_path):
    """This process uses torch's thread count; a fresh one runs with another count."""
    specs = [fill(spec, wide) for spec in THREAD_SPECS]
    here = torch.get_num_threads()
    there = 1 if here > 1 else 2
    mine = [mergepipe_execute(spec, home, tmp_path / "here" / str(i), seed=7)
            for i, spec in enumerate(specs)]
    res = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, str(there), json.dumps(specs),
                          str(home), str(tmp_path / "there")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == str(there)
    for i, spec in enumerate(specs):
        assert sha(mine[i]) == sha(tmp_path / "there" / str(i)), spec["merge_method"]


def test_a_tensor_merged_alone_equals_the_full_run(models, home, tmp_path):
    """No hidden generator state: merging one tensor in isolation gives the same bytes."""
    from mergepipe import api
    from mergepipe.methods.base import TensorContext, get_method

    spec = fill(STOCHASTIC, models)
    out = state(mergepipe_execute(spec, home, tmp_path / "o", seed=7))
    with api.open_catalog(home) as cat:
        plan = api.build_plan(cat, spec, seed=7, store=False)
    task = next(t for t in plan.tasks if t.name == "model.layers.2.mlp.down_proj.weight")
    sd = {k: state(models[k]) for k in ("base", "c1", "c2")}
    ctx = TensorContext(name=task.name, shape=task.shape, input_keys=tuple(task.input_keys),
                        seed=7)
    alone = get_method("dare_ties").fn(ctx, sd["base"][task.name],
                                       [sd["c1"][task.name], sd["c2"][task.name]], task.params)
    assert torch.equal(alone, out[task.name])


def test_seed_in_the_spec_and_on_the_command_line_agree(models, home, tmp_path):
    import yaml

    from tests.conftest import Cli
    cli = Cli(home)
    plain = fill(STOCHASTIC, models)
    with_seed = tmp_path / "seeded.yml"
    with_seed.write_text(yaml.safe_dump({**plain, "seed": 5}))
    without = tmp_path / "plain.yml"
    without.write_text(yaml.safe_dump(plain))
    cli("apply", with_seed, "--out", tmp_path / "a", "--name", "seed-a")
    cli("apply", without, "--seed", "5", "--out", tmp_path / "b", "--name", "seed-b")
    cli("apply", with_seed, "--seed", "6", "--out", tmp_path / "c", "--name", "seed-c")
    assert sha(tmp_path / "a") == sha(tmp_path / "b")
    assert sha(tmp_path / "a") != sha(tmp_path / "c")  # the command line wins

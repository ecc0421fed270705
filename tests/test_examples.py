"""The mergekit example configs run unchanged through `mergepipe apply` and mergekit.

Only the `/path/to/models/NAME` placeholders are replaced (by the tiny
checkpoints); outputs must match within 1e-6 for deterministic methods and in
expectation for DARE/DELLA.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import Cli
from tests.merge_parity import models  # noqa: F401  (module fixture)
from tests.merge_parity import max_abs_diff, mergekit_merge, signed_gap, state

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "mergekit"
FILES = sorted(p.name for p in EXAMPLES.glob("*.yml"))
PLACEHOLDER = re.compile(r"/path/to/models/([\w.-]+)")
STOCHASTIC = {"dare_ties", "dare_linear", "della", "della_linear"}
NAMES = {"llama-base": "base", "math-expert": "e1", "code-expert": "e2", "chat-expert": "e3",
         "ft-run-1": "c1", "ft-run-2": "c2", "ft-run-3": "c3"}


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Cli:
    return Cli(tmp_path_factory.mktemp("examples-ws"))


def test_one_example_per_method():
    from mergepipe.methods.base import all_methods
    methods = [yaml.safe_load((EXAMPLES / f).read_text())["merge_method"] for f in FILES]
    assert sorted(methods) == sorted(m for m in all_methods() if not m.startswith("test_"))
    assert all(f == f"{m}.yml" for f, m in zip(FILES, methods))


@pytest.mark.parametrize("name", FILES)
def test_example_runs_unchanged_and_matches_mergekit(name, models, cli, tmp_path,
                                                     tmp_path_factory):
    text = PLACEHOLDER.sub(lambda m: str(Path(models[NAMES[m.group(1)]]).resolve()),
                           (EXAMPLES / name).read_text())
    assert "/path/to/" not in text
    spec = tmp_path / name
    spec.write_text(text)
    cli("apply", spec, "--out", tmp_path / "ours", "--name", f"example-{name[:-4]}")
    cfg = yaml.safe_load(text)
    theirs = state(mergekit_merge(cfg, tmp_path_factory.getbasetemp(), seed=0))
    ours = state(tmp_path / "ours")
    if cfg["merge_method"] not in STOCHASTIC:
        diff = max_abs_diff(ours, theirs)
        print(f"\nexample {name}: float32 max abs diff {diff:.3g}")
        assert diff <= 1e-6
        return
    base = state(models["base"])
    experts = [state(Path(m["model"])) for m in cfg["models"] if m["model"] != cfg["base_model"]]
    direction = {k: sum(e[k] - base[k] for e in experts) for k in base}
    gap, se = signed_gap(ours, theirs, base, direction)
    assert abs(gap) <= 3 * se, (gap, se)
    assert not all(torch.equal(ours[k], theirs[k]) for k in ours)  # really two draws

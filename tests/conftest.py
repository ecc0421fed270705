"""Shared fixtures: tiny real Llama checkpoints and a CLI runner.

Checkpoints are made with transformers' LlamaConfig and save_pretrained, as
mergekit's own tests do, so every test reads real safetensors files.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Everything a test run writes stays in one temporary home, removed at the end:
# the world cache, DuckDB's extension folder, torch's extension cache and
# matplotlib's config all follow HOME / XDG, in this process and its children.
# Parallel workers (pytest -n) inherit the home their controller made, so they
# share one world cache; only the process that made the home removes it.
_OWNER = "MERGEPIPE_TEST_HOME" not in os.environ
_HOME = Path(tempfile.mkdtemp(prefix="mergepipe-tests-")) if _OWNER else \
    Path(os.environ["MERGEPIPE_TEST_HOME"])
os.environ.update({
    "MERGEPIPE_TEST_HOME": str(_HOME),
    "HOME": str(_HOME), "XDG_CACHE_HOME": str(_HOME / ".cache"),
    "XDG_CONFIG_HOME": str(_HOME / ".config"), "MPLCONFIGDIR": str(_HOME / ".config" / "mpl"),
    "TORCH_EXTENSIONS_DIR": str(_HOME / ".cache" / "torch_extensions"),
    "MERGEPIPE_CACHE": str(_HOME / ".cache" / "mergepipe"),
    "HF_HOME": str(_HOME / ".cache" / "huggingface"),
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})

import pytest  # noqa: E402
import sqlalchemy as sa  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWNER:
        shutil.rmtree(_HOME, ignore_errors=True)


def make_llama(path: Path, seed: int, layers: int = 4, hidden: int = 32, vocab: int = 128,
               dtype: torch.dtype = torch.float32, base: Path | None = None,
               scale: float = 0.02, shard: str | None = None) -> Path:
    """A tiny LlamaForCausalLM; with ``base``, a fine-tune-like perturbation of it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if base is not None:
        ref = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                p.copy_(q + scale * torch.randn_like(q))
    model = model.to(dtype)
    kwargs: dict[str, Any] = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> dict[str, Path]:
    """base + three experts (4 layers, hidden 32, float32)."""
    root = tmp_path_factory.mktemp("family")
    base = make_llama(root / "base", 0)
    return {"base": base,
            "e1": make_llama(root / "e1", 1, base=base),
            "e2": make_llama(root / "e2", 2, base=base),
            "e3": make_llama(root / "e3", 3, base=base)}


@pytest.fixture
def family(tiny_family, tmp_path) -> dict[str, Path]:
    """A private copy of the tiny family that a test may damage."""
    out = {}
    for name, src in tiny_family.items():
        out[name] = Path(shutil.copytree(src, tmp_path / "models" / name))
    return out


class Cli:
    """Runs `mergepipe` in-process against one workspace."""

    def __init__(self, home: Path):
        self.home = home
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True):
        from mergepipe.cli import cli
        res = self.runner.invoke(cli, ["--home", str(self.home), *map(str, args)],
                                 catch_exceptions=False)
        if ok and res.exit_code != 0:
            raise AssertionError(f"mergepipe {' '.join(map(str, args))} failed "
                                 f"({res.exit_code}): {res.stderr or res.output}")
        return res

    def snapshot(self) -> dict[str, list]:
        """Every catalog row, to prove a failed command changed nothing."""
        from mergepipe.catalog import schema
        from mergepipe.catalog.store import open_catalog
        with open_catalog(self.home) as cat:
            return {t.name: sorted(map(repr, cat.rows(sa.select(t))))
                    for t in schema.metadata.sorted_tables}


@pytest.fixture
def cli(tmp_path) -> Cli:
    return Cli(tmp_path / "ws")


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def ties_with_a_gradient(path: Path) -> Path:
    """TIES over models registered as base, math and code; code's weight runs
    0.2 → 0.6 across the layers, so per-layer records have something to show."""
    return write_spec(path, "merge_method: ties\nbase_model: base\nmodels:\n"
                      "  - model: math\n    parameters: {weight: 0.7, density: 0.5}\n"
                      "  - model: code\n    parameters: {weight: [0.2, 0.6], density: 0.5}\n"
                      "dtype: float32\n")


def resident_search(cli: Cli, tmp_path: Path, world: Path, limit: int,
                    **cfg: Any) -> tuple[list[dict], list[dict]]:
    """Run a small resident-evaluator search on ``world``, check that nothing was
    written per candidate, and materialise its front; (trial rows, front rows)."""
    import json

    import yaml

    from mergepipe.catalog import schema
    from mergepipe.catalog.store import open_catalog
    config = {"base": str(world / "base"), "reasoning": str(world / "reasoning"),
              "tasks": [str(world / "test.jsonl")], "algorithm": "sobol", "workers": 1,
              "seed": 0, "limit": limit, "evaluator": "resident", **cfg}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(config))
    final = json.loads(cli("search", "run", tmp_path / "s.yml", "--json")
                       .stdout.strip().splitlines()[-1])
    assert final["trials"] == config["n_total"] and final["failed"] == 0
    root = cli.home / "searches" / final["search_id"]
    assert not list(root.glob("t*")) and not list(root.glob(".t*"))   # nothing per candidate
    with open_catalog(cli.home) as cat:
        trials = cat.rows(sa.select(schema.trials).order_by(schema.trials.c.trial))
        plans = {r["plan_id"] for r in cat.rows(sa.select(schema.plans.c.plan_id))}
        runs = cat.rows(sa.select(schema.runs))
    assert all(t["plan_id"] in plans and t["model_id"] is None for t in trials) and not runs
    rows = [json.loads(line) for line in
            cli("search", "pareto", final["search_id"], "--materialize", "--json")
            .stdout.splitlines()]
    assert rows and all(r["on_disk"] and r["model_id"] for r in rows)
    return trials, rows

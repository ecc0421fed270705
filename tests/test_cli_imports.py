"""Catalog questions stay quick: the commands that only read rows never load torch.

Each command runs in a fresh interpreter (as a user's shell runs it) that
reports which heavy modules were imported by the time it exited.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergepipe import api

HEAVY = ("torch", "transformers", "botorch", "safetensors.torch", "numba")

PROBE = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)),
                              file=sys.stderr))
sys.argv = ["mergepipe"] + {args!r}
from mergepipe.cli import main
main()
"""


def heavy_modules_loaded(args: list[str], home: Path) -> list[str]:
    res = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY, args=args)],
                         capture_output=True, text=True, env=_env(home))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stderr.strip().splitlines()[-1])


def _env(home: Path) -> dict[str, str]:
    import os
    return {**os.environ, "MERGEPIPE_HOME": str(home)}


@pytest.mark.parametrize("args", [
    ["--help"], ["apply", "--help"], ["search", "run", "--help"], ["world", "build", "--help"],
    ["sql", "SELECT count(*) AS n FROM models"], ["models"], ["models", "--format", "json"],
    ["lineage", "merged"], ["explain", "--help"],
])
def test_reading_commands_never_import_torch(args, tiny_family, tmp_path):
    home = tmp_path / "ws"
    with api.open_catalog(home) as cat:  # a catalog with a model and a merge to list
        api.register(cat, tiny_family["base"], name="base")
        plan = api.build_plan(cat, {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": str(tiny_family["e1"]), "parameters": {"weight": 1.0}},
            {"model": str(tiny_family["e2"]), "parameters": {"weight": 1.0}}]})
        api.apply_plan(cat, plan, tmp_path / "merged")
    assert heavy_modules_loaded(args, home) == []


def test_the_probe_sees_torch_when_a_command_loads_it(tiny_family, tmp_path):
    home = tmp_path / "ws"
    args = ["register", str(tiny_family["base"]), "--name", "base"]
    assert "torch" not in heavy_modules_loaded(args, home)  # registering reads headers only
    spec = tmp_path / "s.yml"
    spec.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "base", "parameters": {"weight": 1.0}}]}))
    assert "torch" in heavy_modules_loaded(["apply", str(spec), "--out", str(tmp_path / "o")],
                                           home)

"""Lineage answers "with what weights?": the per-layer parameters the engine used are
rows SQL can query, and `lineage_view` says when a weight varies instead of averaging."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cli, ties_with_a_gradient, write_spec

LAYERS = 4  # the tiny family's depth


def _sql(cli, query: str) -> list[dict]:
    return [json.loads(x) for x in cli("sql", query, "--format", "json").output.splitlines()]


def _register(cli, fam):
    for name, key in (("base", "base"), ("math", "e1"), ("code", "e2"), ("chat", "e3")):
        cli("register", fam[key], "--name", name)


def _ties(tmp_path: Path) -> Path:
    return ties_with_a_gradient(tmp_path / "ties.yml")


def _gradient(lo: float, hi: float, layer: int) -> float:
    """mergekit's interpolation of a two-point gradient at layer ``layer`` of LAYERS."""
    t = layer / (LAYERS - 1)
    return (1 - t) * lo + t * hi


def test_ties_gradient_weights_per_layer_are_exact_in_sql(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    cli("apply", _ties(tmp_path), "--out", tmp_path / "mc", "--name", "math-code")
    rows = _sql(cli, "SELECT parent, role, layer, weight, density, tensors, params_json "
                     "FROM lineage_layers_view WHERE child = 'math-code' "
                     "ORDER BY parent, layer NULLS FIRST")
    by = {(r["parent"], r["layer"]): r for r in rows}
    assert len(rows) == 3 * (LAYERS + 1) and all(r["tensors"] is None for r in rows)
    assert [by["code", i]["weight"] for i in range(LAYERS)] == \
        [_gradient(0.2, 0.6, i) for i in range(LAYERS)]
    assert by["code", 0]["weight"] == 0.2 and by["code", LAYERS - 1]["weight"] == 0.6
    assert by["code", None]["weight"] == 0.2  # embeddings, norm and head sit at t = 0
    assert {by["math", i]["weight"] for i in [None, *range(LAYERS)]} == {0.7}
    assert {r["density"] for r in rows if r["role"] == "expert"} == {0.5}
    base = [r for r in rows if r["parent"] == "base"]
    assert all(r["role"] == "base" and r["weight"] is None and r["density"] is None for r in base)
    assert json.loads(base[0]["params_json"]).keys() >= {"lambda", "normalize"}
    assert json.loads(by["code", 1]["params_json"])["weight"] == _gradient(0.2, 0.6, 1)


def test_lineage_view_says_when_a_weight_varies(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    cli("apply", _ties(tmp_path), "--out", tmp_path / "mc", "--name", "math-code")
    rows = {r["parent"]: r for r in _sql(
        cli, "SELECT parent, weight, weight_varies, weights FROM lineage_view "
             "WHERE child = 'math-code'")}
    assert rows["code"] == {"parent": "code", "weight": None, "weight_varies": True,
                            "weights": "0.2..0.6 by layer"}
    assert rows["math"] == {"parent": "math", "weight": 0.7, "weight_varies": False,
                            "weights": "0.7"}
    assert rows["base"]["weight"] is None and rows["base"]["weights"] is None
    lineage = {r["parent"]: r for r in (json.loads(x) for x in cli(
        "lineage", "math-code", "--format", "json").output.splitlines())}
    assert lineage["code"]["weight"] is None and lineage["code"]["weights"] == "0.2..0.6 by layer"
    assert lineage["math"]["weight"] == 0.7


def test_filters_split_a_layer_by_tensor(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    spec = write_spec(tmp_path / "f.yml", "merge_method: task_arithmetic\nbase_model: base\n"
                      "models:\n  - model: math\n    parameters:\n      weight:\n"
                      "        - {filter: self_attn, value: 0.3}\n        - {value: 0.8}\n")
    cli("apply", spec, "--out", tmp_path / "f")
    rows = _sql(cli, "SELECT layer, weight, tensors, num_tensors FROM lineage_layers_view "
                     "WHERE child = 'f' AND parent = 'math' AND layer = 1 ORDER BY weight")
    assert [r["weight"] for r in rows] == [0.3, 0.8]
    attn, rest = rows[0]["tensors"].split(","), rows[1]["tensors"].split(",")
    assert attn and all(t.startswith("self_attn.") for t in attn)
    assert rows[0]["num_tensors"] == len(attn)
    assert rest and not any("self_attn" in t for t in rest)
    view = _sql(cli, "SELECT weight, weights FROM lineage_view "
                     "WHERE child = 'f' AND parent = 'math'")
    assert view == [{"weight": None, "weights": "0.3..0.8 by tensor"}]


def test_a_zero_weight_layer_is_recorded_as_weight_zero(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    spec = write_spec(tmp_path / "z.yml", "merge_method: task_arithmetic\nbase_model: base\n"
                      "models:\n  - model: math\n    parameters:\n"
                      "      weight: {layers: [0, 0.5, 0.5, 1], default: 1}\n")
    cli("apply", spec, "--out", tmp_path / "z")
    rows = _sql(cli, "SELECT layer, weight FROM lineage_layers_view WHERE child = 'z' "
                     "AND parent = 'math' ORDER BY layer NULLS FIRST")
    assert [(r["layer"], r["weight"]) for r in rows] == [
        (None, 1.0), (0, 0.0), (1, 0.5), (2, 0.5), (3, 1.0)]
    assert _sql(cli, "SELECT weights FROM lineage_view WHERE child = 'z' AND parent = 'math'") \
        == [{"weights": "0.0..1.0 by layer"}]


def test_recover_writes_the_same_layer_rows(cli, tiny_family, tmp_path):
    """A commit finished by `recover` after a kill records what a whole apply records."""
    whole = Cli(tmp_path / "ws-whole")
    for c in (cli, whole):
        _register(c, tiny_family)
    spec = _ties(tmp_path)
    whole("apply", spec, "--out", tmp_path / "whole", "--name", "m")
    proc = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(cli.home), "apply",
                           str(spec), "--out", str(tmp_path / "cut"), "--name", "m"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MERGEPIPE_CRASH_AT": "after_rename"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(json.loads(cli("recover", "--json").output)["completed"]) == 1
    q = ("SELECT parent, role, layer, weight, density, tensors, num_tensors, params_json "
         "FROM lineage_layers_view WHERE child = 'm' ORDER BY parent, layer NULLS FIRST, tensors")
    rows = _sql(cli, q)
    assert rows == _sql(whole, q) and len(rows) == 3 * (LAYERS + 1)
    assert [r["weight"] for r in rows if r["parent"] == "code"] == \
        [0.2, *(_gradient(0.2, 0.6, i) for i in range(LAYERS))]


def test_commits_recorded_before_layer_rows_show_their_mean(cli, tiny_family, tmp_path):
    from mergepipe.catalog import schema
    from mergepipe.catalog.store import open_catalog
    _register(cli, tiny_family)
    cli("apply", _ties(tmp_path), "--out", tmp_path / "mc", "--name", "math-code")
    with open_catalog(cli.home) as cat:   # as a catalog written by an older version
        cat.execute(schema.lineage_layers.delete())
    rows = {r["parent"]: r for r in _sql(
        cli, "SELECT l.parent, l.weight, l.weights, l.weight_varies, e.weight AS mean "
             "FROM lineage_view l JOIN lineage e ON e.run_id = l.run_id "
             "JOIN models p ON p.model_id = e.parent_model_id AND p.name = l.parent "
             "WHERE l.child = 'math-code'")}
    assert rows["code"]["weight"] == rows["code"]["mean"] and rows["code"]["weight_varies"] is None
    assert rows["code"]["weights"] == f"mean {rows['code']['mean']}"
    assert rows["math"]["weight"] == 0.7

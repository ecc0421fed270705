"""Plan and apply end to end: outputs that transformers loads, parity with mergekit,
streamed files equal to the official writer's, lineage you can query."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_llama, write_spec


def ta_spec(tmp_path: Path, fam: dict[str, Path], extra: str = "") -> Path:
    return write_spec(tmp_path / "ta.yml", f"""
merge_method: task_arithmetic
base_model: {fam['base']}
models:
  - model: {fam['e1']}
    parameters: {{weight: 0.7}}
  - model: {fam['e2']}
    parameters: {{weight: 0.4}}
dtype: float32
{extra}""")


def state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_output_loads_in_transformers_with_the_in_memory_merge_logits(cli, tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "merged"
    res = cli("apply", ta_spec(tmp_path, tiny_family), "--out", out, "--json")
    info = json.loads(res.output)
    assert info["out"] == str(out) and info["model"] == "merged"
    base, e1, e2 = (state(tiny_family[k]) for k in ("base", "e1", "e2"))
    expected = {k: base[k] + 0.7 * (e1[k] - base[k]) + 0.4 * (e2[k] - base[k]) for k in base}
    ref = AutoModelForCausalLM.from_pretrained(tiny_family["base"], dtype=torch.float32)
    ref.load_state_dict(expected)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 64, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_streamed_shard_is_byte_identical_to_the_official_writer(cli, tiny_family, tmp_path):
    out = tmp_path / "merged"
    cli("apply", ta_spec(tmp_path, tiny_family), "--out", out)
    tensors = load_file(out / "model.safetensors")
    save_file(tensors, tmp_path / "official.safetensors", metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "official.safetensors").read_bytes()


def test_sharded_output_with_index_loads_in_transformers(cli, tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "sharded"
    cli("apply", ta_spec(tmp_path, tiny_family, "out_shard_size: 30KB\n"), "--out", out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert set(model.state_dict()) >= set(index["weight_map"])
    for f in ("config.json", "generation_config.json"):
        assert (out / f).exists()
    assert cli("verify", out).exit_code == 0


def test_bf16_output_is_the_rounded_float32_merge(cli, tiny_family, tmp_path):
    cli("apply", ta_spec(tmp_path, tiny_family), "--out", tmp_path / "f32")
    spec = ta_spec(tmp_path, tiny_family).read_text().replace("dtype: float32", "dtype: bfloat16")
    cli("apply", write_spec(tmp_path / "bf.yml", spec), "--out", tmp_path / "bf16")
    f32, bf = state(tmp_path / "f32"), state(tmp_path / "bf16")
    assert all(bf[k].dtype == torch.bfloat16 and torch.equal(bf[k], f32[k].bfloat16()) for k in f32)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_plan_id_is_stable_and_reapply_returns_the_commit(cli, tiny_family, tmp_path):
    spec = ta_spec(tmp_path, tiny_family)
    p1 = json.loads(cli("plan", spec, "--json").output)["plan_id"]
    p2 = json.loads(cli("plan", spec, "--json").output)["plan_id"]
    assert p1 == p2
    first = json.loads(cli("apply", "--plan", p1[:10], "--out", tmp_path / "m", "--json").output)
    again = json.loads(cli("apply", spec, "--out", tmp_path / "m", "--json").output)
    assert again["reused"] and again["run_id"] == first["run_id"] and again["out"] == first["out"]
    assert again["bytes_written"] == 0 and again["reused_from"] is None
    assert first["bytes_read"]["experts"] == 2 * (tiny_family["e1"] / "model.safetensors").stat().st_size \
        - 2 * _header_bytes(tiny_family["e1"] / "model.safetensors")


def _header_bytes(path: Path) -> int:
    import struct
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_explain_shows_bytes_per_layer_and_model(cli, tiny_family, tmp_path):
    pid = json.loads(cli("plan", ta_spec(tmp_path, tiny_family), "--json").output)["plan_id"]
    rows = [json.loads(line) for line in cli("explain", pid, "--format", "json").output.splitlines()]
    layers = {r["layer"] for r in rows}
    assert {"0", "1", "2", "3", "-"} <= layers
    per_model = {}
    for r in rows:
        per_model[r["model"]] = per_model.get(r["model"], 0) + r["read"]
    assert per_model["e1"] == per_model["e2"] == per_model["base"]


def test_lineage_is_recursive_and_queryable_with_sql(cli, tiny_family, tmp_path):
    cli("register", tiny_family["base"], "--name", "base")
    cli("register", tiny_family["e1"], "--name", "math")
    cli("register", tiny_family["e2"], "--name", "code")
    cli("register", tiny_family["e3"], "--name", "chat")
    write_spec(tmp_path / "a.yml", "merge_method: ties\nbase_model: base\nmodels:\n"
               "  - model: math\n    parameters: {weight: 0.7, density: 0.5}\n"
               "  - model: code\n    parameters: {weight: 0.3, density: 0.5}\n")
    cli("apply", tmp_path / "a.yml", "--out", tmp_path / "mc", "--name", "math-code")
    write_spec(tmp_path / "b.yml", "merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
               "  - model: math-code\n    parameters: {weight: 0.5}\n"
               "  - model: chat\n    parameters: {weight: 0.25}\n")
    cli("apply", tmp_path / "b.yml", "--out", tmp_path / "all", "--name", "all")
    rows = [json.loads(x) for x in cli("lineage", "all", "--format", "json").output.splitlines()]
    assert {(r["depth"], r["child"], r["parent"]) for r in rows} == {
        (1, "all", "base"), (1, "all", "math-code"), (1, "all", "chat"),
        (2, "math-code", "base"), (2, "math-code", "math"), (2, "math-code", "code")}
    q = ("SELECT child, weight FROM lineage_view WHERE parent = 'math' AND role = 'expert'")
    got = [json.loads(x) for x in cli("sql", q, "--format", "json").output.splitlines()]
    assert got == [{"child": "math-code", "weight": 0.7}]


@pytest.mark.parametrize("stmt", ["INSERT INTO models (model_id) VALUES ('x')", "DROP TABLE runs",
                                  "ATTACH 'other.duckdb' AS o", "COPY models TO 'dump.csv'",
                                  "SELECT 1; DELETE FROM runs"])
def test_sql_refuses_writes(cli, stmt):
    cli("init")
    before = cli.snapshot()
    res = cli("sql", stmt, ok=False)
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert cli.snapshot() == before


def test_sql_formats(cli, tiny_family):
    cli("register", tiny_family["base"], "--name", "base")
    q = "SELECT name, num_layers FROM models"
    assert json.loads(cli("sql", q, "--format", "json").output) == {"name": "base", "num_layers": 4}
    assert cli("sql", q, "--format", "csv").output.splitlines() == ["name,num_layers", "base,4"]
    assert "(1 row)" in cli("sql", q).output


def test_python_api_matches_the_cli(cli, tmp_path, tiny_family):
    from mergepipe import api
    spec = ta_spec(tmp_path, tiny_family)
    with api.open_catalog(tmp_path / "lib-ws") as cat:
        plan = api.build_plan(cat, spec)
        res = api.apply_plan(cat, plan, tmp_path / "lib")
        assert res.plan_id == plan.plan_id and Path(res.out).exists()
        assert api.verify(res.out).ok
    info = json.loads(cli("apply", spec, "--out", tmp_path / "cli", "--json").output)
    assert Path(info["out"]) == tmp_path / "cli"
    shards = sorted(p.name for p in (tmp_path / "lib").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "cli").glob("*.safetensors")) != []
    for f in shards:
        assert (tmp_path / "lib" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes()

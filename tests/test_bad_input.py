"""Bad input: a one-line error, a nonzero exit, no output directory, an unchanged catalog."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import write_spec

SHARD = "model.safetensors"


def ta(tmp_path: Path, fam: dict[str, Path], method: str = "task_arithmetic",
       e1: str = "{weight: 0.5}", extra: str = "") -> Path:
    return write_spec(tmp_path / "spec.yml", f"""
merge_method: {method}
base_model: {fam['base']}
models:
  - model: {fam['e1']}
    parameters: {e1}
  - model: {fam['e2']}
    parameters: {{weight: 0.5}}
{extra}""")


def assert_refused(cli, tmp_path: Path, spec: Path, needle: str, *extra: str) -> None:
    """Apply must fail cleanly: one line naming the problem, nothing left behind."""
    cli("init")
    before = cli.snapshot()
    out = tmp_path / "out"
    res = cli("apply", spec, "--out", out, *extra, ok=False)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert cli.snapshot() == before


def _rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_truncated_shard(cli, family, tmp_path):
    f = family["e1"] / SHARD
    f.write_bytes(f.read_bytes()[:-1000])
    assert_refused(cli, tmp_path, ta(tmp_path, family), "truncated")


def test_header_length_larger_than_file(cli, family, tmp_path):
    f = family["e1"] / SHARD
    raw = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    assert_refused(cli, tmp_path, ta(tmp_path, family), "header length")


def test_header_that_is_not_json(cli, family, tmp_path):
    f = family["e1"] / SHARD
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"#not{js!"
    f.write_bytes(bytes(raw))
    assert_refused(cli, tmp_path, ta(tmp_path, family), "not valid JSON")


def test_tensor_offsets_out_of_range(cli, family, tmp_path):
    def push(header):
        name = next(k for k in header if k != "__metadata__")
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [b + 10**9, e + 10**9]
    _rewrite_header(family["e1"] / SHARD, push)
    assert_refused(cli, tmp_path, ta(tmp_path, family), "out of range")


def test_expert_missing_a_tensor(cli, family, tmp_path):
    sd = load_file(family["e1"] / SHARD)
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, family["e1"] / SHARD, metadata={"format": "pt"})
    assert_refused(cli, tmp_path, ta(tmp_path, family), "has no tensor 'model.layers.1.mlp.down_proj.weight'")


def test_shape_mismatch(cli, family, tmp_path):
    sd = load_file(family["e1"] / SHARD)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file(sd, family["e1"] / SHARD, metadata={"format": "pt"})
    assert_refused(cli, tmp_path, ta(tmp_path, family), "shape mismatch")


def test_dtype_mismatch(cli, family, tmp_path):
    sd = load_file(family["e2"] / SHARD)
    sd["model.norm.weight"] = sd["model.norm.weight"].half()
    save_file(sd, family["e2"] / SHARD, metadata={"format": "pt"})
    assert_refused(cli, tmp_path, ta(tmp_path, family), "dtype mismatch")


def test_nan_in_an_expert_is_refused_unless_allowed(cli, family, tmp_path):
    sd = load_file(family["e2"] / SHARD)
    sd["model.layers.3.self_attn.v_proj.weight"][0, 0] = float("nan")
    save_file(sd, family["e2"] / SHARD, metadata={"format": "pt"})
    spec = ta(tmp_path, family)
    assert_refused(cli, tmp_path, spec, "NaN or Inf")
    cli("apply", spec, "--out", tmp_path / "out", "--allow-nonfinite")
    merged = load_file(tmp_path / "out" / SHARD)
    assert torch.isnan(merged["model.layers.3.self_attn.v_proj.weight"]).any()


def test_unknown_method(cli, family, tmp_path):
    assert_refused(cli, tmp_path, ta(tmp_path, family, method="frobnicate"), "unknown merge method 'frobnicate'")


def test_unknown_parameter(cli, family, tmp_path):
    assert_refused(cli, tmp_path, ta(tmp_path, family, e1="{weight: 0.5, densty: 0.3}"),
                   "unknown parameter 'densty'")


def test_per_layer_weights_of_the_wrong_length(cli, family, tmp_path):
    spec = ta(tmp_path, family, e1="{weight: {layers: [0.1, 0.2, 0.3], default: 0.5}}")
    assert_refused(cli, tmp_path, spec, "per-layer list has 3 values")


def test_unsupported_spec_key(cli, family, tmp_path):
    assert_refused(cli, tmp_path, ta(tmp_path, family, extra="chat_template: chatml\n"),
                   "'chat_template' is not supported")


def test_output_dir_that_exists_is_kept_unless_overwrite(cli, family, tmp_path):
    spec = ta(tmp_path, family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli("init")
    before = cli.snapshot()
    res = cli("apply", spec, "--out", out, ok=False)
    assert res.exit_code != 0 and "already exists" in res.stderr
    assert (out / "keep.txt").read_text() == "mine" and cli.snapshot() == before
    res = cli("apply", spec, "--out", out, "--overwrite", ok=False)  # not a MergePipe output
    assert res.exit_code != 0 and "not a MergePipe output" in res.stderr
    assert (out / "keep.txt").read_text() == "mine" and cli.snapshot() == before
    (out / "keep.txt").unlink()
    cli("apply", spec, "--out", out, "--overwrite")  # an empty folder may be replaced
    cli("apply", ta(tmp_path, family, e1="{weight: 0.25}"), "--out", out, "--overwrite")
    assert (out / SHARD).exists() and cli("verify", out).exit_code == 0


def test_register_of_a_corrupt_model_changes_nothing(cli, family):
    f = family["e1"] / SHARD
    f.write_bytes(f.read_bytes()[:100])
    cli("init")
    before = cli.snapshot()
    res = cli("register", family["e1"], ok=False)
    assert res.exit_code != 0 and res.stderr.startswith("error: ")
    assert cli.snapshot() == before


def test_verify_detects_a_tampered_output(cli, family, tmp_path):
    cli("apply", ta(tmp_path, family), "--out", tmp_path / "out")
    f = tmp_path / "out" / SHARD
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    res = cli("verify", tmp_path / "out", ok=False)
    assert res.exit_code != 0 and "hash differs" in res.stderr

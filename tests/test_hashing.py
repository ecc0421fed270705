"""Tensor hashes: blake3 for everything new, and catalogs and outputs from the blake2b days still check."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
from mergepipe.catalog import schema
from mergepipe.catalog.register import hash_tensors, scan
from mergepipe.catalog.store import open_catalog
from mergepipe.hashing import BLAKE2B, BLAKE3, kind_of
from mergepipe.runs.manifest import MANIFEST, verify_dir
from mergepipe.safetensors_format import read_header
from tests.safety import ta_spec
from tests.test_safety_inputs import _tamper_in_place

SHARD = "model.safetensors"


def _raw(path: Path, name: str) -> bytes:
    e = read_header(path / SHARD).tensors[name]
    with open(path / SHARD, "rb") as f:
        f.seek(e.offset)
        return f.read(e.nbytes)


def test_new_hashes_are_tagged_blake3_of_the_raw_bytes(tiny_family):
    got = hash_tensors(scan(tiny_family["e1"]))
    name = "model.layers.0.mlp.up_proj.weight"
    assert got[name] == "b3:" + blake3.blake3(_raw(tiny_family["e1"], name)).hexdigest(length=16)
    old = hash_tensors(scan(tiny_family["e1"]), kind=BLAKE2B)
    assert old[name] == hashlib.blake2b(_raw(tiny_family["e1"], name), digest_size=16).hexdigest()
    assert {kind_of(h) for h in got.values()} == {BLAKE3}
    assert {kind_of(h) for h in old.values()} == {BLAKE2B}


def _to_blake2b(home: Path, family: dict[str, Path], keys: list[str]) -> None:
    """Rewrite the catalog's tensor hashes as an older MergePipe recorded them."""
    with open_catalog(home) as cat:
        for key in keys:
            legacy = hash_tensors(scan(family[key]), kind=BLAKE2B)
            model_id = cat.require_model(key)["model_id"]
            for name, h in legacy.items():
                cat.execute(schema.tensors.update()
                            .where(schema.tensors.c.model_id == model_id,
                                   schema.tensors.c.name == name)
                            .values(content_hash=h))


def test_a_catalog_with_blake2b_hashes_still_merges_and_still_catches_a_changed_file(
        cli, family, tmp_path):
    for n in ("base", "e1", "e2"):
        cli("register", family[n], "--name", n)
    _to_blake2b(cli.home, family, ["base", "e1", "e2"])
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    cli("apply", spec, "--out", tmp_path / "out")
    assert verify_dir(tmp_path / "out").ok
    # the same check still fires on the old hashes (another spec: no reuse of the commit)
    _tamper_in_place(family["e2"] / SHARD, "model.norm.weight")
    spec = ta_spec(tmp_path / "s2.yml", "base", ["e1", "e2"], "{weight: 0.25}")
    res = cli("apply", spec, "--out", tmp_path / "out2", ok=False)
    assert res.exit_code != 0 and "is not what was registered" in res.stderr
    assert not (tmp_path / "out2").exists()


def test_an_output_whose_manifest_holds_blake2b_hashes_verifies(cli, family, tmp_path):
    for n in ("base", "e1"):
        cli("register", family[n], "--name", n)
    cli("apply", ta_spec(tmp_path / "s.yml", "base", ["e1"]), "--out", tmp_path / "out")
    manifest_path = tmp_path / "out" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["tensor_hash"] == BLAKE3
    manifest["tensor_hash"] = BLAKE2B
    manifest["tensors"] = hash_tensors(scan(tmp_path / "out"), kind=BLAKE2B)
    manifest_path.write_text(json.dumps(manifest))
    assert verify_dir(tmp_path / "out").ok
    name = sorted(manifest["tensors"])[0]
    manifest["tensors"][name] = "0" * 32
    manifest_path.write_text(json.dumps(manifest))
    problems = verify_dir(tmp_path / "out").problems
    assert problems == [f"tensor {name!r}: hash differs from the manifest"]


def test_a_manifest_naming_an_unknown_hash_is_a_problem_not_a_crash(cli, family, tmp_path):
    for n in ("base", "e1"):
        cli("register", family[n], "--name", n)
    cli("apply", ta_spec(tmp_path / "s.yml", "base", ["e1"]), "--out", tmp_path / "out")
    manifest_path = tmp_path / "out" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["tensor_hash"] = "md5"
    manifest_path.write_text(json.dumps(manifest))
    res = verify_dir(tmp_path / "out")
    assert not res.ok and res.problems == ["manifest names an unknown tensor hash 'md5'"]
    out = cli("verify", tmp_path / "out", ok=False)
    assert out.exit_code != 0

"""Inputs are what the catalog says, parameters make sense, outputs are what the manifest says."""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mergepipe.engine.reader import BlockReader
from tests.conftest import make_llama, write_spec
from tests.safety import models, one_line_error, refused, ta_spec, tree

SHARD = "model.safetensors"


def _watch(tmp_path: Path, cli) -> list[Path]:
    return [tmp_path, cli.home]


# -- parameters ---------------------------------------------------------------

@pytest.mark.parametrize("params,needle", [
    ("{weight: .nan}", "'weight': nan is not a finite number"),
    ("{weight: .inf}", "'weight': inf is not a finite number"),
    ("{weight: -.inf}", "is not a finite number"),
    ('{weight: "1e400"}', "'weight': '1e400' is not a finite number"),
    ('{weight: "nan"}', "is not a finite number"),
    ("{weight: true}", "'weight': expected a number, got True (a boolean)"),
    ("{weight: [0.1, .nan]}", "is not a finite number"),
    ("{weight: {layers: [0.1, 0.2, 0.3, true]}}", "'layers' must be a list of numbers"),
    ("{weight: {layers: [0.1, 0.2, 0.3, .nan]}}", "is not a finite number"),
    ("{weight: {layers: [0.1, 0.2, 0.3, 0.4], default: .inf}}", "is not a finite number"),
    ("{weight: [{filter: mlp, value: 1e400}, {value: 0.5}]}", "not a finite number"),
    ("{weight: abc}", "expected a number, got 'abc'"),
    ("{weight: 0.5, density: -0.5}", "'density': -0.5 is outside [0, 1]"),
    ("{weight: 0.5, density: 1.5}", "'density': 1.5 is outside [0, 1]"),
    ("{weight: 0.5, density: [0.2, 3]}", "outside [0, 1]"),
])
def test_bad_parameter_values(cli, family, tmp_path, params, needle):
    spec = ta_spec(tmp_path / "s.yml", family["base"], [family["e1"], family["e2"]], params)
    spec.write_text(spec.read_text().replace("task_arithmetic", "ties"))
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], needle, _watch(tmp_path, cli))


@pytest.mark.parametrize("extra,needle", [
    ("parameters: {normalize: 0.5}", "'normalize': expected true or false"),
    ("parameters: {lambda: .nan}", "'lambda': nan is not a finite number"),
    ("out_shard_size: -1", "out_shard_size must be positive"),
    ("out_shard_size: 0", "out_shard_size must be positive"),
    ("out_shard_size: 1e400", "out_shard_size must be a finite size"),
    ('out_shard_size: "1e400GB"', "out_shard_size must be a finite size"),
    ("out_shard_size: true", "cannot read out_shard_size"),
    ("out_shard_size: [1]", "cannot read out_shard_size"),
    ("dtype: float128", "dtype 'float128' is not supported"),
    ("dtype: int8", "dtype 'int8' is not supported"),
    ("out_dtype: bool", "out_dtype 'bool' is not supported"),
    ("dtype: [bfloat16]", "is not supported"),
    ("seed: true", "seed must be a non-negative integer"),
    ("seed: 1.5", "seed must be a non-negative integer"),
    ("seed: -3", "seed must be a non-negative integer"),
    ("name: [1, 2]", "name must be a string"),
])
def test_bad_spec_settings(cli, family, tmp_path, extra, needle):
    spec = ta_spec(tmp_path / "s.yml", family["base"], [family["e1"], family["e2"]], extra=extra)
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], needle, _watch(tmp_path, cli))


def test_boolean_switches_still_read_as_mergekit_does(cli, family, tmp_path):
    spec = ta_spec(tmp_path / "s.yml", family["base"], [family["e1"], family["e2"]],
                   extra="parameters: {normalize: 'false', int8_mask: 0}\nseed: '7'")
    cli("apply", spec, "--out", tmp_path / "out")


# -- spec files ---------------------------------------------------------------

def test_yaml_alias_bomb(cli, family, tmp_path):
    """Nine levels of nine aliases: under 1 KB of YAML, 9**9 strings once expanded."""
    levels = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    spec = write_spec(tmp_path / "bomb.yml", f"merge_method: linear\nmodels:\n  - model: "
                      f"{family['e1']}\n    parameters: {{weight: 1.0}}\nname:\n"
                      + "\n".join(f"  {ln}" for ln in levels) + "\n")
    assert spec.stat().st_size < 1000
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "expands to more than",
            _watch(tmp_path, cli))
    refused(cli, ["plan", spec], "expands to more than", _watch(tmp_path, cli))


def test_self_referencing_yaml(cli, family, tmp_path):
    spec = write_spec(tmp_path / "loop.yml", f"merge_method: linear\nname: &n [x, *n]\nmodels:\n"
                                             f"  - model: {family['e1']}\n    parameters: "
                                             f"{{weight: 1.0}}\n")
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "", _watch(tmp_path, cli))


def test_huge_spec_file(cli, family, tmp_path):
    spec = ta_spec(tmp_path / "s.yml", family["base"], [family["e1"], family["e2"]])
    spec.write_text(spec.read_text() + "# " + "x" * (2 << 20) + "\n")
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "must be under 1048576 bytes",
            _watch(tmp_path, cli))


def test_binary_spec_file(cli, family, tmp_path):
    spec = tmp_path / "s.yml"
    spec.write_bytes(bytes(range(256)) * 4)
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "not a UTF-8 text file",
            _watch(tmp_path, cli))
    spec.write_bytes(b"merge_method: linear\x00\x01\n")
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "not valid YAML",
            _watch(tmp_path, cli))


def test_spec_that_is_a_folder_or_missing(cli, family, tmp_path):
    refused(cli, ["apply", tmp_path, "--out", tmp_path / "out"], "is a directory",
            _watch(tmp_path, cli))
    refused(cli, ["apply", tmp_path / "nope.yml", "--out", tmp_path / "out"], "does not exist",
            _watch(tmp_path, cli))


# -- input files --------------------------------------------------------------

def _tamper_in_place(shard: Path, tensor: str) -> None:
    """Change one tensor's bytes, keeping size and mtime (as a careless copy tool might)."""
    st = shard.stat()
    from mergepipe.safetensors_format import read_header
    e = read_header(shard).tensors[tensor]
    with open(shard, "r+b") as f:
        f.seek(e.offset)
        data = bytearray(f.read(e.nbytes))
        data[:4] = struct.pack("<f", 0.123)
        f.seek(e.offset)
        f.write(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("method,tensor", [
    ("task_arithmetic", "model.layers.2.mlp.down_proj.weight"),   # block by block
    ("ties", "model.layers.3.self_attn.q_proj.weight"),           # whole tensors
    ("task_arithmetic", "model.norm.weight"),
])
def test_expert_changed_in_place_with_mtime_restored(cli, family, tmp_path, method, tensor):
    for n in ("base", "e1", "e2"):
        cli("register", family[n], "--name", n)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"], "{weight: 0.5, density: 0.5}"
                   if method == "ties" else "{weight: 0.5}")
    spec.write_text(spec.read_text().replace("task_arithmetic", method))
    _tamper_in_place(family["e2"] / SHARD, tensor)
    refused(cli, ["apply", spec, "--out", tmp_path / "out"],
            f"model 'e2': tensor {tensor!r} in {family['e2'] / SHARD} is not what was registered",
            _watch(tmp_path, cli))


def test_stored_plan_applied_after_the_base_changed(cli, family, tmp_path):
    for n in ("base", "e1", "e2"):
        cli("register", family[n], "--name", n)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    plan_id = json.loads(cli("plan", spec, "--json").output)["plan_id"]
    _tamper_in_place(family["base"] / SHARD, "model.embed_tokens.weight")
    refused(cli, ["apply", "--plan", plan_id, "--out", tmp_path / "out"],
            "model 'base': tensor 'model.embed_tokens.weight'", _watch(tmp_path, cli))


def test_file_overwritten_while_the_merge_runs(cli, family, tmp_path, monkeypatch):
    """A shard rewritten between two of the engine's reads fails the run before commit."""
    for n in ("base", "e1", "e2"):
        cli("register", family[n], "--name", n)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"], "{weight: 0.5, density: 0.5}")
    spec.write_text(spec.read_text().replace("task_arithmetic", "ties"))
    real_pread = BlockReader.pread
    calls = []

    def pread(self, read, start, nbytes):   # every physical read, whichever thread makes it
        calls.append(read)
        if len(calls) == 10:  # a while into the run, someone copies a new e1 over the old
            sd = load_file(family["e1"] / SHARD)
            save_file({k: v * 1.5 for k, v in sd.items()}, tmp_path / "new.safetensors",
                      metadata={"format": "pt"})
            with open(family["e1"] / SHARD, "r+b") as f:  # same inode, as `cp` does
                f.write((tmp_path / "new.safetensors").read_bytes())
            (tmp_path / "new.safetensors").unlink()
        return real_pread(self, read, start, nbytes)

    monkeypatch.setattr(BlockReader, "pread", pread)
    cli("init")
    before = cli.snapshot()
    res = cli("apply", spec, "--out", tmp_path / "out", ok=False)
    one_line_error(res, "model 'e1': tensor")
    assert "is not what was registered" in res.stderr and len(calls) > 10
    assert cli.snapshot() == before and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_partly_read_tensors_under_a_budget_still_merge(cli, family, tmp_path):
    """Under an I/O budget some tensors are read in part: not hash-checked, and not refused."""
    for n in ("base", "e1", "e2"):
        cli("register", family[n], "--name", n)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    cli("apply", spec, "--out", tmp_path / "out", "--io-budget", "30%")
    assert cli("verify", tmp_path / "out").exit_code == 0


def _index_model(root: Path, src: Path, target: str) -> Path:
    """A copy of ``src`` whose index maps every tensor to ``target``."""
    d = root / "indexed"
    d.mkdir(parents=True)
    (d / "config.json").write_bytes((src / "config.json").read_bytes())
    names = list(load_file(src / SHARD))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: target for n in names}}))
    return d


@pytest.mark.parametrize("target", ["../../outside.safetensors", "/tmp/outside.safetensors",
                                    "sub/../../outside.safetensors"])
def test_index_entries_must_stay_inside_the_model_folder(cli, family, tmp_path, target):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((family["e1"] / SHARD).read_bytes())
    d = _index_model(tmp_path / "a" / "b", family["e1"], target)
    refused(cli, ["register", d], "lies outside the model folder", _watch(tmp_path, cli))
    spec = ta_spec(tmp_path / "s.yml", family["base"], [d, family["e2"]])
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "lies outside the model folder",
            _watch(tmp_path, cli))


def test_catalog_row_pointing_outside_is_refused_at_read_time(cli, family, tmp_path):
    """Even a catalog edited by hand cannot make the engine read outside a model folder."""
    from mergepipe.catalog import schema
    from mergepipe.catalog.store import open_catalog
    for n in ("base", "e1", "e2"):
        cli("register", family[n], "--name", n)
    (tmp_path / "models" / "x.safetensors").write_bytes((family["e1"] / SHARD).read_bytes())
    with open_catalog(cli.home) as cat:
        cat.execute(schema.tensors.update().where(
            schema.tensors.c.model_id == models(cli)["e1"]["model_id"]).values(
            file="../x.safetensors"))
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", tmp_path / "out"], "lies outside the model folder",
            _watch(tmp_path, cli))


@pytest.mark.parametrize("kind", ["duplicate_key", "fifo", "dev_zero", "empty", "header_only"])
def test_odd_shards(cli, family, tmp_path, kind):
    f = family["e1"] / SHARD
    if kind == "duplicate_key":  # JSON keeps the last of two entries with one name
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        doc = json.loads(raw[8:8 + n])
        name = next(k for k, v in doc.items() if k != "__metadata__" and v["data_offsets"][0])
        e = dict(doc[name])
        e["data_offsets"] = [0, e["data_offsets"][1] - e["data_offsets"][0]]
        new = (json.dumps(doc)[:-1] + f", {json.dumps(name)}: {json.dumps(e)}}}").encode()
        new += b" " * (-len(new) % 8)
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    elif kind == "fifo":
        f.unlink()
        os.mkfifo(f)
    elif kind == "dev_zero":
        f.unlink()
        f.symlink_to("/dev/zero")
    elif kind == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(struct.pack("<Q", 8) + b"{}      ")
    line = refused(cli, ["register", family["e1"]], "", _watch(tmp_path, cli))
    assert str(family["e1"]) in line


# -- outputs ------------------------------------------------------------------

@pytest.fixture
def sharded_output(cli, tmp_path, tiny_family):
    for n in ("base", "e1", "e2"):
        cli("register", tiny_family[n], "--name", n)
    out = tmp_path / "merged"
    cli("apply", ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"], extra="out_shard_size: 60KB"),
        "--out", out)
    assert (out / "model.safetensors.index.json").exists()
    return out


@pytest.mark.parametrize("damage,needle", [
    ("delete_index", "model.safetensors.index.json: missing"),
    ("edit_index", "model.safetensors.index.json: differs from the manifest"),
    ("replace_config", "config.json: differs from the manifest"),
    ("add_file", "notes.md: not in the manifest"),
    ("edit_card", "README.md: differs from the manifest"),
    ("edit_header", "header differs from the manifest"),
    ("delete_manifest_entry", "config.json: not in the manifest"),
])
def test_verify_covers_every_file(cli, sharded_output, damage, needle):
    out = sharded_output
    assert cli("verify", out).exit_code == 0
    if damage == "delete_index":
        (out / "model.safetensors.index.json").unlink()
    elif damage == "edit_index":
        p = out / "model.safetensors.index.json"
        p.write_text(p.read_text().replace('"metadata"', '"metadatA"'))
    elif damage == "replace_config":
        cfg = json.loads((out / "config.json").read_text())
        cfg["num_hidden_layers"] = 2
        (out / "config.json").write_text(json.dumps(cfg))
    elif damage == "add_file":
        (out / "notes.md").write_text("# best model ever\n")
    elif damage == "edit_card":
        (out / "README.md").write_text("# best model ever\n")
    elif damage == "edit_header":
        shard = sorted(out.glob("model-*.safetensors"))[0]
        raw = shard.read_bytes()
        assert raw.count(b'"format":"pt"') == 1  # same length, still valid
        shard.write_bytes(raw.replace(b'"format":"pt"', b'"format":"PT"'))
    else:
        m = json.loads((out / "mergepipe_manifest.json").read_text())
        del m["side_files"]["config.json"]
        (out / "mergepipe_manifest.json").write_text(json.dumps(m))
    res = cli("verify", out, ok=False)
    one_line_error(res, needle)


def test_verify_lists_the_side_files_with_hashes(cli, sharded_output):
    m = json.loads((sharded_output / "mergepipe_manifest.json").read_text())
    assert set(m["side_files"]) >= {"config.json", "model.safetensors.index.json"}
    assert all(len(v["sha256"]) == 64 for v in m["side_files"].values())
    assert set(m["headers"]) == set(m["files"]) and len(m["files"]) > 1


# -- one line for OS failures -------------------------------------------------

def _bigger_pair(root: Path, hidden: int = 128, vocab: int = 2048) -> dict[str, Path]:
    base = make_llama(root / "base", 0, layers=2, hidden=hidden, vocab=vocab)
    return {"base": base, "e1": make_llama(root / "e1", 1, layers=2, hidden=hidden, vocab=vocab,
                                           base=base)}


def test_disk_full_on_a_small_tmpfs(cli, tmp_path):
    """ENOSPC for real, where a tmpfs can be mounted (root in a container); else skipped
    (the RLIMIT_FSIZE test below gives the same path EFBIG everywhere)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fam = _bigger_pair(tmp_path / "models")
        spec = write_spec(tmp_path / "s.yml", f"merge_method: linear\nmodels:\n"
                          f"  - model: {fam['base']}\n    parameters: {{weight: 0.5}}\n"
                          f"  - model: {fam['e1']}\n    parameters: {{weight: 0.5}}\n")
        line = refused(cli, ["apply", spec, "--out", small / "merged"], "No space left on device",
                       [tmp_path / "models", small])
        assert line.endswith(f": {small / 'merged'}")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_file_size_limit_reached_while_writing(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG): a real write
    failure in the middle of a shard, in any sandbox."""
    fam = _bigger_pair(tmp_path / "models", hidden=256, vocab=4096)
    home = tmp_path / "ws"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    spec = write_spec(tmp_path / "s.yml", f"merge_method: linear\nmodels:\n"
                      f"  - model: {fam['base']}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {fam['e1']}\n    parameters: {{weight: 0.5}}\n")
    for n in ("base", "e1"):
        subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(home), "register",
                        str(fam[n]), "--name", n], check=True, env=env, capture_output=True)
    catalog_size = (home / "catalog.duckdb").stat().st_size
    shard_size = (fam["base"] / SHARD).stat().st_size
    limit = catalog_size + (2 << 20)
    assert shard_size > limit  # the output cannot fit, the catalog can

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = tree(tmp_path / "models")
    proc = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(home), "apply",
                           str(spec), "--out", str(tmp_path / "merged")], env=env,
                          capture_output=True, text=True, preexec_fn=cap, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: File too large (no room left to write the output): ")
    assert lines[0].endswith(f": {tmp_path / 'merged'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "s.yml", "ws"]
    assert tree(tmp_path / "models") == before
    rows = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(home), "sql",
                           "SELECT count(*) AS n FROM runs", "--format", "json"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert json.loads(rows) == {"n": 0}


def test_register_a_file_instead_of_a_folder(cli, family, tmp_path):
    refused(cli, ["register", family["e1"] / SHARD], "is a file", _watch(tmp_path, cli))
    refused(cli, ["verify", family["e1"] / SHARD], "is a file", _watch(tmp_path, cli))


@pytest.mark.parametrize("args,needle", [
    (["apply", "--bogus"], "No such option '--bogus'"),
    (["apply"], "Missing option '--out'"),
    (["sql"], "Missing argument 'QUERY'"),
    (["sql", "SELECT 1", "--timeout", "soon"], "'soon' is not a valid float"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_usage_errors_are_one_line(cli, tmp_path, args, needle):
    refused(cli, args, needle, _watch(tmp_path, cli))

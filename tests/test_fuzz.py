"""Seeded mutation fuzzing of safetensors headers and YAML specs.

Every mutated input must either work (and then its output verifies and holds
only finite numbers) or be refused by the contract: one `error:` line, a
nonzero exit, the same catalog rows, no file left behind. The loops are seeded
and bounded, so a failure names a reproducible case.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.safety import one_line_error, snapshot, tree

SHARD = "model.safetensors"
HEADER_CASES = 80
DATA_CASES = 10
YAML_CASES = 80


def _outcome(cli, args: list, watch: list[Path]) -> str:
    """Run one case; return 'ok' or 'refused' after checking the contract."""
    before, files = snapshot(cli), tree(*watch)
    res = cli(*args, ok=False)
    if res.exit_code == 0:
        return "ok"
    one_line_error(res, "")
    assert snapshot(cli) == before, args
    assert tree(*watch) == files, args
    return "refused"


# -- safetensors headers ------------------------------------------------------

_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "X", "", 3, None, ["F32"]]


def _odd_number(rng: random.Random) -> object:
    return rng.choice([-1, 0, 1, 7, 2**31, 2**63, 2**64 + 1, -(2**63), 1.5, float("1e300"),
                       "12", None, [], {}, True])


def _mutate_json(rng: random.Random, doc: dict) -> None:
    names = [k for k in doc if k != "__metadata__"]
    name = rng.choice(names)
    entry = doc[name]
    what = rng.randrange(9)
    if what == 0:
        entry["dtype"] = rng.choice(_DTYPES)
    elif what == 1:
        shape = list(entry["shape"])
        op = rng.randrange(4)
        if op == 0 and shape:
            shape[rng.randrange(len(shape))] = _odd_number(rng)
        elif op == 1:
            shape.append(rng.choice([1, 2, 0]))
        elif op == 2 and shape:
            shape.pop()
        else:
            shape = rng.choice([[], "3", None, [[1]]])
        entry["shape"] = shape
    elif what == 2:
        offs = list(entry["data_offsets"])
        offs[rng.randrange(2)] = _odd_number(rng) if rng.random() < 0.5 else \
            offs[0] + rng.choice([-4, 4, 8, -8])
        entry["data_offsets"] = offs
    elif what == 3:
        del doc[name]
    elif what == 4:
        other = rng.choice(names)
        entry["data_offsets"] = list(doc[other]["data_offsets"])
    elif what == 5:
        doc[name] = rng.choice([None, 1, "x", [], {"dtype": "F32"}])
    elif what == 6:
        doc["__metadata__"] = rng.choice([None, 1, "x", [], {"a": {"b": 1}}, {"format": "pt"}])
    elif what == 7:
        doc[name + rng.choice(["", "x", "/../x", "\u0000"])] = doc.pop(name)
    else:
        doc.pop(name)
        doc[rng.choice(names)] = entry


def _mutate_shard(rng: random.Random, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8:8 + n], raw[8 + n:]
    kind = rng.randrange(6)
    if kind == 0:  # flip bytes inside the JSON
        b = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return raw[:8] + bytes(b) + data
    if kind == 1:  # a wrong header length
        m = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2**63, 2**64 - 1, rng.randrange(n)])
        return struct.pack("<Q", m) + raw[8:]
    if kind == 2:  # truncated anywhere
        return raw[:rng.randrange(len(raw))]
    if kind == 3:  # bytes added or removed in the data
        pos = rng.randrange(len(data) + 1)
        if rng.random() < 0.5:
            return raw[:8 + n] + data[:pos] + os.urandom(rng.choice([1, 4, 8])) + data[pos:]
        return raw[:8 + n] + data[:pos] + data[pos + rng.choice([1, 4, 8]):]
    doc = json.loads(header)
    _mutate_json(rng, doc)
    new = json.dumps(doc).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data


def test_fuzz_safetensors_headers(cli, tiny_family, tmp_path):
    victim = Path(shutil.copytree(tiny_family["e1"], tmp_path / "victim"))
    clean = (tiny_family["e1"] / SHARD).read_bytes()
    cli("register", tiny_family["base"], "--name", "base")
    spec = tmp_path / "s.yml"
    spec.write_text(f"merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                    f"  - model: {victim}\n    parameters: {{weight: 0.5}}\n")
    counts = {"ok": 0, "refused": 0}
    for case in range(HEADER_CASES):
        rng = random.Random(1000 + case)
        (victim / SHARD).write_bytes(_mutate_shard(rng, clean))
        got = _outcome(cli, ["register", victim, "--name", "victim"], [tmp_path])
        if got == "ok":  # a harmless mutation: the model must then merge or be refused
            out = tmp_path / f"out{case}"
            got = _outcome(cli, ["apply", spec, "--out", out], [tmp_path])
            if got == "ok":
                assert cli("verify", out).exit_code == 0
                assert all(bool(torch.isfinite(t.float()).all())
                           for t in load_file(out / SHARD).values())
                shutil.rmtree(out)
                cli("sql", "SELECT 1")
        counts[got] += 1
    assert counts["refused"] > HEADER_CASES // 2, counts
    print(f"header fuzz: {HEADER_CASES} cases, {counts}")


def test_fuzz_data_changed_after_registration(cli, tiny_family, tmp_path):
    """Random bytes of a registered expert change in place, mtime kept: every merge
    that reads them is refused."""
    victim = Path(shutil.copytree(tiny_family["e1"], tmp_path / "victim"))
    clean = (victim / SHARD).read_bytes()
    (n,) = struct.unpack("<Q", clean[:8])
    cli("register", tiny_family["base"], "--name", "base")
    spec = tmp_path / "s.yml"
    spec.write_text("merge_method: ties\nbase_model: base\nmodels:\n  - model: victim\n"
                    "    parameters: {weight: 0.5, density: 0.7}\n")
    for case in range(DATA_CASES):
        rng = random.Random(5000 + case)
        (victim / SHARD).write_bytes(clean)
        cli("register", victim, "--name", "victim")
        st = (victim / SHARD).stat()
        b = bytearray(clean)
        pos = rng.randrange(8 + n, len(b) - 3) & ~3  # one float32 changed
        b[pos:pos + 4] = struct.pack("<f", rng.uniform(-1, 1))
        assert bytes(b) != clean
        (victim / SHARD).write_bytes(bytes(b))
        os.utime(victim / SHARD, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert _outcome(cli, ["apply", spec, "--out", tmp_path / "out"], [tmp_path]) == "refused"
    print(f"data fuzz: {DATA_CASES} cases refused")


# -- YAML specs ---------------------------------------------------------------

_NASTY = [".nan", ".inf", "-.inf", "1e400", "-1", "1.5", "0", "true", "false", "null", "[]",
          "{}", "''", "~", "*x", "&x a", "!!binary AAAA", "!!python/object:os.system", "0x10",
          "1_000", "'1e-3'", "[0.1, 0.2]", "{filter: mlp, value: 2}", "{layers: [1, 2]}",
          "bfloat16", "int8", "float128", "model", "99999999", "-0.0", "'../../etc'", "\"\\x00\"",
          "[[[[[[]]]]]]", "{a: {b: {c: {d: 1}}}}", "!!set {a}", "2001-12-14", "=", "<<: *x"]


def _mutate_yaml(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        i = rng.randrange(len(lines))
        if op == 0:  # replace a value
            if ":" in lines[i]:
                k = lines[i].index(":")
                lines[i] = lines[i][:k + 1] + " " + rng.choice(_NASTY)
        elif op == 1:  # replace a value inside a flow mapping
            if "{" in lines[i]:
                lines[i] = lines[i].replace("0.5", rng.choice(_NASTY), 1) \
                    .replace("0.7", rng.choice(_NASTY), 1)
        elif op == 2:
            del lines[i]
        elif op == 3:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 4:
            lines[i] = " " * rng.choice([1, 2, 3, 5]) + lines[i]
        elif op == 5:
            pos = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:pos] + rng.choice(["\t", "\x07", ":", "-", "#", "&a", "*a", "{",
                                                    "]", "\u2028", "\ufeff", "'"]) + lines[i][pos:]
        else:
            lines = lines[:i]
        if not lines:
            lines = ["x"]
    return "\n".join(lines) + "\n"


def test_fuzz_yaml_specs(cli, tiny_family, tmp_path):
    for n in ("base", "e1", "e2"):
        cli("register", tiny_family[n], "--name", n)
    valid = ("merge_method: ties\nbase_model: base\nmodels:\n"
             "  - model: e1\n    parameters: {weight: 0.5, density: 0.7}\n"
             "  - model: e2\n    parameters:\n      weight: 0.5\n      density: [0.7, 0.5]\n"
             "parameters:\n  normalize: true\ndtype: float32\nout_shard_size: 1GB\nseed: 3\n")
    spec = tmp_path / "s.yml"
    counts = {"ok": 0, "refused": 0}
    for case in range(YAML_CASES):
        rng = random.Random(9000 + case)
        spec.write_text(_mutate_yaml(rng, valid), encoding="utf-8")
        out = tmp_path / "out"
        got = _outcome(cli, ["apply", spec, "--out", out], [tmp_path])
        if got == "ok":
            assert cli("verify", out).exit_code == 0
            assert all(bool(torch.isfinite(t.float()).all())
                       for t in load_file(out / SHARD).values()), spec.read_text()
            shutil.rmtree(out)
        counts[got] += 1
    assert counts["refused"] > YAML_CASES // 3 and counts["ok"] > 0, counts
    print(f"yaml fuzz: {YAML_CASES} cases, {counts}")


# -- kills --------------------------------------------------------------------

@pytest.mark.parametrize("point", ["mid_write", "after_manifest", "after_rename"])
def test_kill_during_an_overwrite_keeps_a_named_verifiable_output(cli, tiny_family, tmp_path,
                                                                  point):
    """Whatever instant an --overwrite dies at, recover leaves the old or the new output,
    verifiable, under the name its run asked for (test_crash.py kills plain applies at
    every named point and at random instants)."""
    for n in ("base", "e1", "e2"):
        cli("register", tiny_family[n], "--name", n)
    out = tmp_path / "merged"
    spec = tmp_path / "s.yml"
    spec.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                    "  - model: e1\n    parameters: {weight: 0.5}\n")
    cli("apply", spec, "--out", out, "--name", "old")
    spec.write_text(spec.read_text().replace("0.5", "0.25"))
    proc = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(cli.home), "apply",
                           str(spec), "--out", str(out), "--overwrite", "--name", "new"],
                          env={**os.environ, "MERGEPIPE_CRASH_AT": point},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    cli("recover")
    assert cli("verify", out).exit_code == 0
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".replaced-" in p.name]
    names = {json.loads(x)["name"]: json.loads(x)["path"] for x in cli(
        "sql", "SELECT name, path FROM models", "--format", "json").output.splitlines()}
    expect = "old" if point in ("mid_write", "before_manifest", "after_manifest") else "new"
    assert json.loads((out / "mergepipe_manifest.json").read_text()).get("name") in (expect, None)
    assert names.get(expect) == str(out)

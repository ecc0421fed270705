"""Applying a plan committed elsewhere materialises it at the new --out: the same
bytes (hard links where the file system allows), verified, recorded, said `reused`."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mergepipe.runs.manifest import MANIFEST
from tests.safety import models, one_line_error, refused, ta_spec, tree


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _sql(cli, query: str) -> list[dict]:
    return [json.loads(x) for x in cli("sql", query, "--format", "json").output.splitlines()]


def _links_work(where: Path) -> bool:
    a, b = where / ".probe-a", where / ".probe-b"
    a.write_text("x")
    try:
        os.link(a, b)
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            p.unlink(missing_ok=True)


@pytest.fixture
def committed(cli, tiny_family, tmp_path) -> tuple[Path, dict]:
    """A task-arithmetic merge committed at tmp/first (name 'first')."""
    spec = ta_spec(tmp_path / "s.yml", tiny_family["base"], [tiny_family["e1"], tiny_family["e2"]],
                   "{weight: [0.2, 0.6]}")
    first = json.loads(cli("apply", spec, "--out", tmp_path / "first", "--json").output)
    assert not first["reused"]
    return spec, first


def test_reuse_to_another_out_is_byte_identical_linked_verified_and_recorded(
        cli, committed, tmp_path):
    spec, first = committed
    src, dst = Path(first["out"]), tmp_path / "second"
    res = json.loads(cli("apply", spec, "--out", dst, "--name", "copy", "--json").output)
    assert res["reused"] is True and res["reused_from"] == str(src)
    assert res["out"] == str(dst) and res["model"] == "copy" and res["run_id"] != first["run_id"]
    assert res["plan_id"] == first["plan_id"] and res["bytes_read"] == {"base": 0, "experts": 0}
    a, b = _files(src), _files(dst)
    assert set(a) == set(b) and {"model.safetensors", "config.json", "README.md"} <= set(a)
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    if _links_work(tmp_path):
        assert all(a[k].stat().st_ino == b[k].stat().st_ino for k in a)
        assert res["linked_files"] == len(a) and res["copied_files"] == 0
        assert res["bytes_written"] == 0
    assert res["linked_files"] + res["copied_files"] == len(a)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["run_id"] == res["run_id"] and manifest["name"] == "copy"
    assert manifest["reused_from"]["run_id"] == first["run_id"]
    assert "ok: " in cli("verify", dst).output
    rows = models(cli)
    assert rows["copy"]["path"] == str(dst) and rows["copy"]["kind"] == "merged"
    assert rows["copy"]["fingerprint"] == rows["first"]["fingerprint"] or True  # mtimes are shared
    runs = _sql(cli, "SELECT run_id, status, model, reused_from, out_path FROM runs_view "
                     "ORDER BY started_at")
    assert [(r["status"], r["model"], r["reused_from"]) for r in runs] == [
        ("COMMITTED", "first", None), ("COMMITTED", "copy", first["run_id"])]
    lineage = {m: sorted((r["parent"], r["role"], r["weights"]) for r in
                         _sql(cli, f"SELECT * FROM lineage_view WHERE child = '{m}'"))
               for m in ("first", "copy")}
    assert lineage["copy"] == lineage["first"] and len(lineage["copy"]) == 3
    layers = {m: sorted(json.dumps([r["parent"], r["layer"], r["weight"]]) for r in
                        _sql(cli, f"SELECT * FROM lineage_layers_view WHERE child = '{m}'"))
              for m in ("first", "copy")}
    assert layers["copy"] == layers["first"] and layers["copy"]


def test_reused_copy_loads_in_transformers(cli, committed, tmp_path):
    from transformers import AutoModelForCausalLM
    spec, first = committed
    cli("apply", spec, "--out", tmp_path / "second")
    a = AutoModelForCausalLM.from_pretrained(first["out"]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "second").state_dict()
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)


def test_text_output_says_reused(cli, committed, tmp_path):
    spec, first = committed
    out = cli("apply", spec, "--out", tmp_path / "second").output
    assert out.startswith("committed second at ") and "(reused the commit of plan" in out
    assert "hard-linked" in out and "verified" in out
    same = cli("apply", spec, "--out", tmp_path / "first").output
    assert same.startswith("reused: plan ") and "already committed as first" in same
    assert "nothing written" in same


def test_same_out_writes_nothing(cli, committed, tmp_path):
    spec, first = committed
    before = tree(tmp_path / "first")
    res = json.loads(cli("apply", spec, "--out", tmp_path / "first", "--name", "other",
                         "--json").output)
    assert res["reused"] and res["run_id"] == first["run_id"] and res["model"] == "first"
    assert res["reused_from"] is None and res["bytes_written"] == 0
    assert tree(tmp_path / "first") == before
    assert len(_sql(cli, "SELECT * FROM runs")) == 1


def test_copies_where_links_are_refused(cli, committed, tmp_path, monkeypatch):
    spec, first = committed
    real_link = os.link

    def cross_device(src, dst, *a, **kw):
        if Path(src).is_relative_to(Path(first["out"])):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "link", cross_device)
    res = json.loads(cli("apply", spec, "--out", tmp_path / "second", "--json").output)
    a, b = _files(Path(first["out"])), _files(tmp_path / "second")
    assert res["reused"] and res["linked_files"] == 0 and res["copied_files"] == len(a)
    assert res["bytes_written"] == sum(p.stat().st_size for p in a.values())
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    assert all(a[k].stat().st_ino != b[k].stat().st_ino for k in a)
    assert cli("verify", tmp_path / "second").exit_code == 0


def test_reuse_respects_output_safety(cli, committed, tmp_path):
    spec, first = committed
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    refused(cli, ["apply", spec, "--out", taken], "already exists", [tmp_path])
    refused(cli, ["apply", spec, "--out", taken, "--overwrite"], "not a MergePipe output",
            [tmp_path])
    refused(cli, ["apply", spec, "--out", tmp_path / "first" / "sub"], "lies inside",
            [tmp_path])
    refused(cli, ["apply", spec, "--out", tmp_path / "second", "--name", "first"],
            "model name 'first' is already used", [tmp_path])
    assert not (tmp_path / "second").exists()


def test_reuse_overwrites_a_previous_merge_output(cli, committed, tiny_family, tmp_path):
    spec, first = committed
    other = ta_spec(tmp_path / "o.yml", tiny_family["base"], [tiny_family["e3"]])
    cli("apply", other, "--out", tmp_path / "second")
    one_line_error(cli("apply", spec, "--out", tmp_path / "second", ok=False), "already exists")
    res = json.loads(cli("apply", spec, "--out", tmp_path / "second", "--overwrite",
                         "--json").output)
    assert res["reused"] and res["reused_from"] == first["out"]
    assert json.loads((tmp_path / "second" / MANIFEST).read_text())["plan_id"] == first["plan_id"]
    assert cli("verify", tmp_path / "second").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".replaced-" in p.name]


def test_a_damaged_commit_is_merged_again_not_linked(cli, committed, tmp_path):
    spec, first = committed
    src = Path(first["out"]) / "model.safetensors"
    good = src.read_bytes()
    damaged = bytearray(good)
    damaged[-1] ^= 0x40   # one bit of the last tensor's data
    src.write_bytes(bytes(damaged))
    res = cli("apply", spec, "--out", tmp_path / "second", "--json")
    info = json.loads(res.stdout)
    assert "does not match its manifest" in res.stderr and "merging from the inputs" in res.stderr
    assert not info["reused"] and info["bytes_read"]["experts"] > 0
    assert (tmp_path / "second" / "model.safetensors").read_bytes() == good
    assert cli("verify", tmp_path / "second").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_a_reuse_killed_after_the_rename_is_recovered_as_a_reuse(cli, committed, tmp_path):
    spec, first = committed
    out = tmp_path / "second"
    proc = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(cli.home), "apply",
                           str(spec), "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "MERGEPIPE_CRASH_AT": "after_rename"}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _sql(cli, "SELECT status FROM runs WHERE out_path = "
                     f"'{out}'") == [{"status": "PENDING"}]
    rep = json.loads(cli("recover", "--json").output)
    assert len(rep["completed"]) == 1
    runs = _sql(cli, "SELECT status, model, reused_from FROM runs_view "
                     f"WHERE out_path = '{out}'")
    assert runs == [{"status": "COMMITTED", "model": "second", "reused_from": first["run_id"]}]
    assert len(_sql(cli, "SELECT * FROM lineage_layers_view WHERE child = 'second'")) > 0

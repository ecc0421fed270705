"""A merge killed at any instant leaves no output or a verifiable one; recover cleans up."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import open_catalog
from tests.conftest import make_llama, write_spec


@pytest.fixture(scope="module")
def bigger_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crashfam")
    base = make_llama(root / "base", 0, layers=4, hidden=256, vocab=4096)
    return {"base": base, "e1": make_llama(root / "e1", 1, layers=4, hidden=256, vocab=4096, base=base),
            "e2": make_llama(root / "e2", 2, layers=4, hidden=256, vocab=4096, base=base)}


def _spec(tmp_path: Path, fam: dict[str, Path]) -> Path:
    return write_spec(tmp_path / "ties.yml", f"""
merge_method: ties
base_model: {fam['base']}
models:
  - model: {fam['e1']}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {fam['e2']}
    parameters: {{weight: 0.4, density: 0.5}}
out_shard_size: 8MB
""")


def _mergepipe(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergepipe", "--home", str(home), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _check_after_kill(home: Path, tmp_path: Path, out: Path) -> str:
    """Invariants after a kill and after `recover`; returns what was found."""
    from mergepipe import api
    state = "absent"
    if out.exists():
        assert api.verify(out).ok
        state = "complete"
    with open_catalog(home) as cat:
        api.recover(cat)
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".replaced-" in p.name]
    with open_catalog(home) as cat:
        runs = cat.rows(sa.select(schema.runs.c.status, schema.runs.c.out_path))
        models = {m["path"] for m in cat.rows(sa.select(schema.models.c.path))}
    assert all(r["status"] != "PENDING" for r in runs)
    if out.exists():  # a landed output is recorded, verifiable, and in the catalog
        assert str(out) in models
        assert any(r["status"] == "COMMITTED" for r in runs)
    else:
        assert str(out) not in models
    return state


@pytest.mark.parametrize("point", ["mid_write", "before_manifest", "after_manifest",
                                   "after_rename", "after_commit"])
def test_kill_at_each_commit_step_is_recoverable(bigger_family, tmp_path, point):
    home, out = tmp_path / "ws", tmp_path / "merged"
    proc = _mergepipe(home, "apply", str(_spec(tmp_path, bigger_family)), "--out", str(out),
                      env={"MERGEPIPE_CRASH_AT": point})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    state = _check_after_kill(home, tmp_path, out)
    expected = "absent" if point in ("mid_write", "before_manifest", "after_manifest") else "complete"
    assert state == expected


def _wait_for_staging(proc: subprocess.Popen, where: Path) -> float:
    """Block until the engine has started writing (a staging folder exists)."""
    while proc.poll() is None:
        if any(".staging-" in p.name for p in where.iterdir()):
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError("the run ended before it wrote anything")


def test_kill_at_random_instants(bigger_family, tmp_path):
    """Kills land at random instants of the write-and-commit window, timed from a
    reference run on this machine; each one that lands leaves no output or a whole one."""
    spec = _spec(tmp_path, bigger_family)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = _mergepipe(tmp_path / "ws-ref", "apply", str(spec), "--out", str(ref_dir / "merged"))
    started = _wait_for_staging(ref, ref_dir)
    ref.communicate(timeout=300)
    assert ref.returncode == 0
    window = time.monotonic() - started
    rng = random.Random(1234)
    landed = []
    for i in range(4):
        where = tmp_path / f"k{i}"
        where.mkdir()
        proc = _mergepipe(tmp_path / f"ws{i}", "apply", str(spec), "--out", str(where / "merged"))
        _wait_for_staging(proc, where)
        time.sleep(rng.uniform(0.0, 0.8) * window)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=300)
        if proc.returncode == -signal.SIGKILL:  # still running when the signal came
            landed.append(_check_after_kill(tmp_path / f"ws{i}", where, where / "merged"))
    assert landed, "no kill landed while the merge was running"
    assert set(landed) <= {"absent", "complete"}


def test_recover_restores_the_old_output_when_an_overwrite_dies_mid_swap(bigger_family, tmp_path):
    home, out = tmp_path / "ws", tmp_path / "merged"
    spec = _spec(tmp_path, bigger_family)
    first = _mergepipe(home, "apply", str(spec), "--out", str(out), "--json")
    info = json.loads(first.communicate(timeout=300)[0])
    spec.write_text(spec.read_text().replace("weight: 0.6", "weight: 0.5"))
    proc = _mergepipe(home, "apply", str(spec), "--out", str(out), "--overwrite",
                      env={"MERGEPIPE_CRASH_AT": "after_manifest"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    _check_after_kill(home, tmp_path, out)
    manifest = json.loads((out / "mergepipe_manifest.json").read_text())
    assert manifest["run_id"] == info["run_id"]

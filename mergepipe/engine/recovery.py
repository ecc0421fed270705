"""After a crash: finish or undo interrupted runs, and check outputs against manifests."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.register import hash_tensors, scan
from mergepipe.catalog.store import Catalog, now
from mergepipe.engine.execute import ExecReport
from mergepipe.engine.transaction import MANIFEST, RunTicket, record_commit, trash_path
from mergepipe.errors import BadCheckpointError, MergePipeError
from mergepipe.planner.build import load_plan


@dataclass
class VerifyResult:
    path: str
    plan_id: str | None
    tensors: int
    ok: bool
    problems: list[str] = field(default_factory=list)


def verify_dir(path: str | Path) -> VerifyResult:
    """Re-hash every tensor and compare with the manifest written at commit."""
    path = Path(path).expanduser().resolve()
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise MergePipeError(f"{path}: no {MANIFEST}; not a MergePipe output (or incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return VerifyResult(str(path), None, 0, False, ["manifest is not valid JSON"])
    problems: list[str] = []
    for rel, size in manifest.get("files", {}).items():
        f = path / rel
        if not f.exists():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {size}")
    hashes: dict[str, str] = {}
    if not problems:
        try:
            hashes = hash_tensors(scan(path))
        except BadCheckpointError as exc:
            problems.append(str(exc))
    expected = manifest.get("tensors", {})
    if hashes:
        for name, h in expected.items():
            if hashes.get(name) != h:
                problems.append(f"tensor {name!r}: hash differs from the manifest")
        for name in set(hashes) - set(expected):
            problems.append(f"tensor {name!r}: not in the manifest")
    return VerifyResult(str(path), manifest.get("plan_id"), len(expected), not problems, problems)


@dataclass
class RecoverReport:
    rolled_back: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    removed_dirs: list[str] = field(default_factory=list)


def recover(cat: Catalog) -> RecoverReport:
    """Resolve every PENDING run: complete it if its output landed intact, else undo it."""
    report = RecoverReport()
    runs = cat.rows(sa.select(schema.runs).where(schema.runs.c.status == "PENDING"))
    for run in runs:
        if _alive_here(run):
            continue  # a live process (e.g. a search coordinator) still owns it
        out, staging = Path(run["out_path"]), Path(run["staging_path"])
        trash = trash_path(out, run["run_id"])
        landed = (out / MANIFEST).exists() and \
            json.loads((out / MANIFEST).read_text()).get("run_id") == run["run_id"]
        if landed and verify_dir(out).ok:
            plan = load_plan(cat, run["plan_id"])
            manifest = json.loads((out / MANIFEST).read_text())
            rep = ExecReport(plan.plan_id, {}, 0, 0, sum(manifest["files"].values()), 0.0, 0,
                             manifest["tensors"], manifest["files"])
            ticket = RunTicket(run["run_id"], plan.plan_id, str(out), str(staging))
            record_commit(cat, plan, ticket, rep, None)
            report.completed.append(run["run_id"])
        else:
            if landed:  # present but corrupt: take it away rather than leave a bad model
                shutil.rmtree(out)
                report.removed_dirs.append(str(out))
            if trash.exists() and not out.exists():
                trash.rename(out)  # an --overwrite that died mid-swap: restore the old one
            cat.execute(schema.runs.update().where(schema.runs.c.run_id == run["run_id"]).values(
                status="ROLLED_BACK", finished_at=now(), error="interrupted; rolled back"))
            report.rolled_back.append(run["run_id"])
        for d in (staging, trash):
            if d.exists():
                shutil.rmtree(d)
                report.removed_dirs.append(str(d))
    return report


def _alive_here(run: dict) -> bool:
    import os
    import socket
    if run.get("host") != socket.gethostname() or not run.get("pid") or run["pid"] == os.getpid():
        return False
    try:
        os.kill(run["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

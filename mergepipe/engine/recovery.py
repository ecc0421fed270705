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
from mergepipe.engine.transaction import (MANIFEST, RunTicket, file_sha256, record_commit,
                                          staging_path, trash_path)
from mergepipe.errors import MergePipeError
from mergepipe.planner.build import load_plan
from mergepipe.safetensors_format import read_header


@dataclass
class VerifyResult:
    path: str
    plan_id: str | None
    tensors: int
    ok: bool
    problems: list[str] = field(default_factory=list)


def verify_dir(path: str | Path) -> VerifyResult:
    """Check every file of an output against the manifest written at commit.

    Tensors are re-hashed; side files (index, config, tokenizer, card) and
    shard headers are compared by sha256; a file the manifest does not list,
    or a listed one that is gone, is a problem too.
    """
    path = Path(path).expanduser().resolve()
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise MergePipeError(f"{path}: no {MANIFEST}; not a MergePipe output (or incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
        weights = dict(manifest.get("files", {}))
        side = dict(manifest.get("side_files", {}))
        headers = dict(manifest.get("headers", {}))
        expected = dict(manifest.get("tensors", {}))
    except (ValueError, TypeError, AttributeError):
        return VerifyResult(str(path), None, 0, False, ["manifest is not valid JSON"])
    problems: list[str] = []
    for rel, size in weights.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != size:
            problems.append(f"{rel}: {f.stat().st_size} bytes, manifest says {size}")
        elif rel in headers and _header_sha256(f) != headers[rel]:
            problems.append(f"{rel}: header differs from the manifest")
    for rel, info in side.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != info.get("size") or file_sha256(f) != info.get("sha256"):
            problems.append(f"{rel}: differs from the manifest")
    if "side_files" in manifest:  # format 2 lists every file; older ones only the weights
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if not p.is_dir() and rel != MANIFEST and rel not in weights and rel not in side:
                problems.append(f"{rel}: not in the manifest")
    hashes: dict[str, str] = {}
    if not problems:
        try:
            hashes = hash_tensors(scan(path))
        except MergePipeError as exc:
            problems.append(str(exc))
    if hashes:
        for name, h in expected.items():
            if hashes.get(name) != h:
                problems.append(f"tensor {name!r}: hash differs from the manifest")
        for name in set(hashes) - set(expected):
            problems.append(f"tensor {name!r}: not in the manifest")
    return VerifyResult(str(path), manifest.get("plan_id"), len(expected), not problems, problems)


def _header_sha256(f: Path) -> str | None:
    try:
        return file_sha256(f, read_header(f).data_start)
    except MergePipeError:
        return None


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
        out = Path(run["out_path"])
        # only the folders this run itself names are ever removed, whatever the row says
        staging, trash = staging_path(out, run["run_id"]), trash_path(out, run["run_id"])
        manifest = _manifest(out)
        landed = manifest.get("run_id") == run["run_id"]
        if landed and verify_dir(out).ok:
            plan = load_plan(cat, run["plan_id"])
            rep = ExecReport(plan.plan_id, {}, 0, 0, sum(manifest["files"].values()), 0.0, 0,
                             manifest["tensors"], manifest["files"])
            ticket = RunTicket(run["run_id"], plan.plan_id, str(out), str(staging),
                               name=manifest.get("name"))
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


def _manifest(out: Path) -> dict:
    try:
        doc = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


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

"""The manifest: what a commit wrote, written before the output is renamed into place.

It lists every file (weight shards by size and header hash, side files by
sha256) and every tensor's content hash, so `verify` can tell a complete,
untouched output from a damaged one, and `recover` can finish recording a
commit whose catalog transaction a crash cut off.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergepipe.catalog.register import hash_tensors, scan
from mergepipe.catalog.store import now
from mergepipe.engine.execute import ExecReport
from mergepipe.errors import MergePipeError
from mergepipe.files import file_sha256, fsync_dir
from mergepipe.hashing import BLAKE2B, BLAKE3
from mergepipe.planner.plan import Plan
from mergepipe.safetensors_format import read_header

MANIFEST = "mergepipe_manifest.json"


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of an output folder, or {} when it is missing or unreadable."""
    try:
        doc = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def describe_files(folder: Path, weights: dict[str, int]) -> dict[str, Any]:
    """Manifest entries for everything in an output besides the tensors' data:
    each side file (index, config, tokenizer, card) with its size and sha256,
    and the sha256 of each weight shard's header."""
    side: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() or rel == MANIFEST or rel in weights:
            continue
        side[rel] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    headers = {rel: file_sha256(folder / rel, read_header(folder / rel).data_start)
               for rel in weights}
    return {"side_files": side, "headers": headers}


def write_manifest(staging: Path, plan: Plan, run_id: str, name: str | None,
                   report: ExecReport, reused_from: dict[str, Any] | None = None) -> None:
    """Write and fsync the manifest (and the side files) in the staging folder.

    ``reused_from`` (a reuse of another commit's files) is kept in the manifest so
    that `recover` records a reuse cut short by a crash as one."""
    import safetensors
    import torch

    import mergepipe
    doc = {
        "format": 2,
        "plan_id": plan.plan_id,
        "run_id": run_id,
        "name": name,
        "method": plan.method,
        "inputs": [{"name": s.key, "model_id": s.model_id, "path": s.path,
                    "fingerprint": s.fingerprint, "role": s.role} for s in plan.sources],
        "files": report.files,
        **describe_files(staging, report.files),
        "tensor_hash": BLAKE3,
        "tensors": report.tensor_hashes,
        "phases": report.phases,
        "versions": {"mergepipe": mergepipe.__version__, "torch": torch.__version__,
                     "safetensors": safetensors.__version__, "python": platform.python_version()},
        "created_at": now().isoformat(),
    }
    if reused_from is not None:
        doc["reused_from"] = reused_from
    path = staging / MANIFEST
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for p in staging.rglob("*"):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".safetensors"):
            with open(p, "rb") as fh:  # side files were copied without fsync
                os.fsync(fh.fileno())
    fsync_dir(staging)


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
    kind = manifest.get("tensor_hash", BLAKE2B)
    if kind not in (BLAKE3, BLAKE2B):
        problems.append(f"manifest names an unknown tensor hash {kind!r}")
    if not problems:
        try:
            hashes = hash_tensors(scan(path), kind=kind)
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



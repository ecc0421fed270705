"""Transactional commits: staging directory, manifest, atomic rename, catalog rows.

Order of a commit: the engine writes into ``.NAME.staging-RUN`` beside the
target (files fsynced); the manifest is written and fsynced; the staging
directory is renamed onto the target; then one catalog transaction marks the
run COMMITTED and adds the model and its lineage. A kill at any instant leaves
either no output, or a complete output whose manifest ``recover`` can check
and finish recording.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.register import register_model
from mergepipe.catalog.store import Catalog, new_id, now
from mergepipe.engine.execute import ExecReport
from mergepipe.engine.faults import crash_point
from mergepipe.errors import MergePipeError
from mergepipe.planner.plan import Plan
from mergepipe.safetensors_format import fsync_dir

MANIFEST = "mergepipe_manifest.json"


@dataclass
class RunTicket:
    """A PENDING run: where the engine must write, and where it will land."""

    run_id: str
    plan_id: str
    out: str
    staging: str
    overwrite: bool = False
    plan_inserted: bool = False


@dataclass
class ApplyResult:
    plan_id: str
    run_id: str
    model: str
    model_id: str
    out: str
    bytes_read: dict[str, int]
    bytes_written: int
    wall_s: float
    peak_rss: int
    reused: bool = False
    io_budget: int | None = None
    error_bound: float | None = None
    error_bound_kind: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def staging_path(out: Path, run_id: str) -> Path:
    return out.parent / f".{out.name}.staging-{run_id[:12]}"


def trash_path(out: Path, run_id: str) -> Path:
    return out.parent / f".{out.name}.replaced-{run_id[:12]}"


def begin_run(cat: Catalog, plan: Plan, out: str | Path, overwrite: bool = False,
              plan_inserted: bool = False, device: str = "cpu") -> RunTicket:
    """Record a PENDING run and create its empty staging directory."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise MergePipeError(f"output directory {out} already exists (pass --overwrite to "
                             f"replace it atomically)")
    out.parent.mkdir(parents=True, exist_ok=True)
    run_id = new_id()
    staging = staging_path(out, run_id)
    staging.mkdir()
    cat.execute(schema.runs.insert().values(
        run_id=run_id, plan_id=plan.plan_id, status="PENDING", out_path=str(out),
        staging_path=str(staging), pid=os.getpid(), host=socket.gethostname(), device=device,
        started_at=now()))
    return RunTicket(run_id, plan.plan_id, str(out), str(staging), overwrite, plan_inserted)


def abort_run(cat: Catalog, ticket: RunTicket) -> None:
    """Undo a run that failed cleanly: no staging left, catalog as before the apply.

    A COMMITTED run is never undone (its model and lineage are already visible).
    """
    rows = cat.rows(sa.select(schema.runs.c.status).where(schema.runs.c.run_id == ticket.run_id))
    if rows and rows[0]["status"] == "COMMITTED":
        raise MergePipeError(f"run {ticket.run_id} is committed; a commit is never undone")
    shutil.rmtree(ticket.staging, ignore_errors=True)
    with cat.transaction() as c:
        c.execute(schema.runs.delete().where(schema.runs.c.run_id == ticket.run_id))
        if ticket.plan_inserted:
            c.execute(schema.plans.delete().where(schema.plans.c.plan_id == ticket.plan_id))


def write_manifest(plan: Plan, ticket: RunTicket, report: ExecReport) -> None:
    import safetensors
    import torch

    import mergepipe
    doc = {
        "format": 1,
        "plan_id": plan.plan_id,
        "run_id": ticket.run_id,
        "method": plan.method,
        "inputs": [{"name": s.key, "model_id": s.model_id, "path": s.path,
                    "fingerprint": s.fingerprint, "role": s.role} for s in plan.sources],
        "files": report.files,
        "tensor_hash": "blake2b-128",
        "tensors": report.tensor_hashes,
        "versions": {"mergepipe": mergepipe.__version__, "torch": torch.__version__,
                     "safetensors": safetensors.__version__, "python": platform.python_version()},
        "created_at": now().isoformat(),
    }
    path = Path(ticket.staging) / MANIFEST
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for p in Path(ticket.staging).iterdir():
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".safetensors"):
            with open(p, "rb") as fh:  # side files were copied without fsync
                os.fsync(fh.fileno())
    fsync_dir(ticket.staging)


def _swap_into_place(ticket: RunTicket) -> None:
    out, staging = Path(ticket.out), Path(ticket.staging)
    trash = trash_path(out, ticket.run_id)
    if out.exists():
        if not ticket.overwrite:
            raise MergePipeError(f"output directory {out} appeared during the run")
        os.rename(out, trash)
    os.rename(staging, out)
    fsync_dir(out.parent)
    shutil.rmtree(trash, ignore_errors=True)


def record_commit(cat: Catalog, plan: Plan, ticket: RunTicket, report: ExecReport,
                  name: str | None) -> dict[str, Any]:
    """One catalog transaction: the new model, its lineage, the run COMMITTED."""
    out = Path(ticket.out)
    with cat.transaction() as c:
        model = register_model(cat, out, name=name or out.name, kind="merged",
                               precomputed_hashes=report.tensor_hashes)
        c.execute(schema.lineage.delete().where(
            schema.lineage.c.child_model_id == model["model_id"]))
        c.execute(schema.lineage.insert(), lineage_rows(plan, model["model_id"], ticket.run_id))
        c.execute(schema.runs.update().where(schema.runs.c.run_id == ticket.run_id).values(
            status="COMMITTED", model_id=model["model_id"],
            bytes_read_base=report.bytes_read_base, bytes_read_experts=report.bytes_read_experts,
            bytes_written=report.bytes_written, wall_s=report.wall_s, peak_rss=report.peak_rss,
            finished_at=now()))
    return model


def lineage_rows(plan: Plan, child_id: str, run_id: str) -> list[dict[str, Any]]:
    """One edge per parent, with the mean weight over tensors as a summary."""
    sums: dict[str, list[float]] = {}
    for t in plan.tasks:
        for key, w in zip(t.input_keys, t.params.get("weight", [])):
            sums.setdefault(key, []).append(float(w))
        for key in t.skipped:
            sums.setdefault(key, []).append(0.0)
    spec_params = {str(m.get("model") if isinstance(m, dict) else m): (m.get("parameters") if isinstance(m, dict) else None)
                   for m in plan.spec.get("models") or []}
    rows = []
    for s in plan.sources:
        ws = sums.get(s.key)
        rows.append(dict(
            child_model_id=child_id, parent_model_id=s.model_id, role=s.role,
            weight=(math.fsum(ws) / len(ws)) if ws else None,
            params_json=json.dumps(_params_for(spec_params, s), default=str),
            plan_id=plan.plan_id, run_id=run_id))
    return rows


def _params_for(spec_params: dict[str, Any], source: Any) -> Any:
    for ref, params in spec_params.items():
        if ref == source.key or (ref and Path(ref).expanduser().resolve().as_posix() == source.path):
            return params
    return None


def commit_run(cat: Catalog, plan: Plan, ticket: RunTicket, report: ExecReport,
               name: str | None = None) -> ApplyResult:
    crash_point("before_manifest")
    write_manifest(plan, ticket, report)
    crash_point("after_manifest")
    _swap_into_place(ticket)
    crash_point("after_rename")
    model = record_commit(cat, plan, ticket, report, name)
    crash_point("after_commit")
    return ApplyResult(
        plan_id=plan.plan_id, run_id=ticket.run_id, model=model["name"],
        model_id=model["model_id"], out=ticket.out,
        bytes_read={"base": report.bytes_read_base, "experts": report.bytes_read_experts},
        bytes_written=report.bytes_written, wall_s=report.wall_s, peak_rss=report.peak_rss,
        io_budget=plan.io_budget, error_bound=plan.error_bound,
        error_bound_kind=plan.error_bound_kind)


def committed_result(cat: Catalog, plan: Plan) -> ApplyResult | None:
    """The existing commit of this plan whose output is still in place, if any."""
    r, m = schema.runs, schema.models
    rows = cat.rows(sa.select(r, m.c.name).join(m, m.c.model_id == r.c.model_id).where(
        r.c.plan_id == plan.plan_id, r.c.status == "COMMITTED").order_by(r.c.finished_at.desc()))
    for row in rows:
        manifest = Path(row["out_path"]) / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text()).get("plan_id") == plan.plan_id:
            return ApplyResult(
                plan_id=plan.plan_id, run_id=row["run_id"], model=row["name"],
                model_id=row["model_id"], out=row["out_path"],
                bytes_read={"base": 0, "experts": 0}, bytes_written=0, wall_s=0.0,
                peak_rss=0, reused=True, io_budget=plan.io_budget,
                error_bound=plan.error_bound, error_bound_kind=plan.error_bound_kind)
    return None

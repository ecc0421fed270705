"""Transactional commits: staging directory, manifest, atomic rename, catalog rows.

Order of a commit: the engine writes into ``.NAME.staging-RUN`` beside the
target (files fsynced); the model card and the manifest are written and
fsynced; the staging directory is renamed onto the target; then one catalog
transaction marks the run COMMITTED and adds the model and its lineage. A
kill at any instant leaves either no output, or a complete output whose
manifest ``recover`` can check and finish recording.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.register import INDEX_FILE, SIDE_FILES, register_model
from mergepipe.catalog.store import Catalog, new_id, now
from mergepipe.engine.execute import ExecReport
from mergepipe.engine.faults import crash_point
from mergepipe.errors import MergePipeError
from mergepipe.files import fsync_dir
from mergepipe.planner.plan import Plan
from mergepipe.runs.card import CARD, write_card
from mergepipe.runs.lineage import layer_rows, lineage_rows
from mergepipe.runs.manifest import MANIFEST, read_manifest, write_manifest


@dataclass
class RunTicket:
    """A PENDING run: where the engine must write, and where it will land."""

    run_id: str
    plan_id: str
    out: str
    staging: str
    overwrite: bool = False
    plan_inserted: bool = False
    name: str | None = None               # requested catalog name (kept by `recover`)
    made_parent: str | None = None        # the first folder above --out that this run created


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
    reused_from: str | None = None        # the commit whose files a reuse linked or copied
    linked_files: int = 0
    copied_files: int = 0
    io_budget: int | None = None
    error_bound: float | None = None
    error_bound_kind: str | None = None
    phases: dict[str, float] = field(default_factory=dict)   # engine seconds per phase

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def staging_path(out: Path, run_id: str) -> Path:
    return out.parent / f".{out.name}.staging-{run_id[:12]}"


def trash_path(out: Path, run_id: str) -> Path:
    return out.parent / f".{out.name}.replaced-{run_id[:12]}"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(cat: Catalog, out: str | Path, overwrite: bool = False,
                 name: str | None = None, plan: Plan | None = None,
                 existing_ok: bool = False, check_name_now: bool = True) -> Path:
    """Refuse, before any work, an output that would destroy data or cannot be recorded.

    ``--overwrite`` may only replace the output's own previous commit: a
    MergePipe output (manifest present) holding no file the manifest does not
    list, that is not an input of this plan, not the parent of another model,
    and holds neither the workspace nor any other registered model. The name
    is checked too, so a taken name fails before anything is written.
    ``existing_ok`` lets an existing output pass without --overwrite (a check
    made before planning: the plan may turn out to be that output's own).
    ``check_name_now`` off defers the name check to the commit, for callers that
    name the model only then (search loops).
    """
    out = Path(out).expanduser().resolve()
    home = cat.home
    if home is not None and _inside(home, out):
        raise MergePipeError(f"--out {out} is or holds the workspace {home}; refusing to "
                             f"write there")
    models = cat.rows(sa.select(schema.models.c.model_id, schema.models.c.name,
                                schema.models.c.path))
    for m in models:
        mp = Path(m["path"])
        if mp != out and _inside(mp, out):
            raise MergePipeError(f"--out {out} holds registered model {m['name']!r} ({mp}); "
                                 f"refusing to write there")
    if plan is not None:
        for src in plan.sources:
            if _inside(Path(src.path), out):
                raise MergePipeError(f"--out {out} is an input of this merge ({src.key}); "
                                     f"choose another output directory")
    if check_name_now:
        check_name(cat, out, name)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise MergePipeError(f"--out {out} exists and is not a directory")
        if not overwrite:
            if existing_ok:
                return out
            raise MergePipeError(f"output directory {out} already exists (pass --overwrite to "
                                 f"replace it atomically)")
        _check_replaceable(cat, out, models)
    elif out.parent.exists() and not out.parent.is_dir():
        raise MergePipeError(f"--out {out}: {out.parent} is not a directory")
    return out


def check_name(cat: Catalog, out: Path, name: str | None) -> None:
    """The catalog name the output will get must be free (or already its own)."""
    wanted = name or out.name
    holder = cat.model_by_name(wanted)
    if holder is not None and holder["path"] != str(out):
        raise MergePipeError(f"model name {wanted!r} is already used for {holder['path']}; "
                             f"pass --name to choose another")


def _check_replaceable(cat: Catalog, out: Path, models: list[dict[str, Any]]) -> None:
    """``out`` may be replaced only when it is an empty folder or a previous commit."""
    entries = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    if not entries and not any(out.iterdir()):
        return
    mine = next((m for m in models if m["path"] == str(out)), None)
    if mine is None and (out / MANIFEST).exists():
        mine = {}
    if mine is None:
        raise MergePipeError(f"--overwrite refused: {out} is not a MergePipe output (no "
                             f"{MANIFEST}); move it away yourself if it should go")
    kind = cat.rows(sa.select(schema.models.c.kind).where(
        schema.models.c.model_id == mine.get("model_id")))
    if kind and kind[0]["kind"] != "merged":
        raise MergePipeError(f"--overwrite refused: {out} is registered model "
                             f"{mine['name']!r}, not a previous merge output")
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        listed = set(manifest.get("files", {})) | set(manifest.get("side_files", {}))
    except (OSError, ValueError, AttributeError):
        raise MergePipeError(f"--overwrite refused: {out / MANIFEST} is unreadable")
    legacy = set(SIDE_FILES) | {INDEX_FILE} if "side_files" not in manifest else set()
    extra = [e for e in entries if e != MANIFEST and e not in listed and e not in legacy]
    if extra:
        raise MergePipeError(f"--overwrite refused: {out} holds {extra[0]!r}, which the "
                             f"previous merge did not write")
    if mine.get("model_id"):
        children = cat.rows(sa.select(schema.models.c.name).join(
            schema.lineage, schema.lineage.c.child_model_id == schema.models.c.model_id).where(
            schema.lineage.c.parent_model_id == mine["model_id"]))
        if children:
            raise MergePipeError(f"--overwrite refused: {out} holds model {mine['name']!r}, a "
                                 f"parent of {children[0]['name']!r}; replacing it would "
                                 f"falsify that lineage")


def begin_run(cat: Catalog, plan: Plan, out: str | Path, overwrite: bool = False,
              plan_inserted: bool = False, device: str = "cpu",
              name: str | None = None) -> RunTicket:
    """Check the output, record a PENDING run and create its empty staging directory.

    Without ``name`` the name is checked at commit (``commit_run`` may give it)."""
    out = check_output(cat, out, overwrite, name, plan, check_name_now=name is not None)
    made = out.parent
    while not made.parent.exists():
        made = made.parent
    made_parent = str(made) if not made.exists() else None
    run_id = new_id()
    staging = staging_path(out, run_id)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        cat.execute(schema.runs.insert().values(
            run_id=run_id, plan_id=plan.plan_id, status="PENDING", out_path=str(out),
            staging_path=str(staging), pid=os.getpid(), host=socket.gethostname(),
            device=device, started_at=now()))
    except BaseException:
        _remove_made(staging, made_parent)
        raise
    return RunTicket(run_id, plan.plan_id, str(out), str(staging), overwrite, plan_inserted,
                     name, made_parent)


def _remove_made(staging: Path, made_parent: str | None) -> None:
    """Take away the staging folder and the (empty) folders made to hold it."""
    shutil.rmtree(staging, ignore_errors=True)
    if made_parent is None:
        return
    d = staging.parent
    while True:
        try:
            d.rmdir()
        except OSError:
            return
        if str(d) == made_parent:
            return
        d = d.parent


def abort_run(cat: Catalog, ticket: RunTicket) -> None:
    """Undo a run that failed cleanly: no staging left, catalog as before the apply.

    A COMMITTED run is never undone (its model and lineage are already visible).
    """
    rows = cat.rows(sa.select(schema.runs.c.status).where(schema.runs.c.run_id == ticket.run_id))
    if rows and rows[0]["status"] == "COMMITTED":
        raise MergePipeError(f"run {ticket.run_id} is committed; a commit is never undone")
    _remove_made(Path(ticket.staging), ticket.made_parent)
    with cat.transaction() as c:
        c.execute(schema.runs.delete().where(schema.runs.c.run_id == ticket.run_id))
        if ticket.plan_inserted:
            c.execute(schema.plans.delete().where(schema.plans.c.plan_id == ticket.plan_id))


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
                  name: str | None, reused_from: dict[str, Any] | None = None) -> dict[str, Any]:
    """One catalog transaction: the new model, its lineage (per parent and per
    layer), the run COMMITTED, and for a reuse the commit it came from."""
    out = Path(ticket.out)
    with cat.transaction() as c:
        model = register_model(cat, out, name=name or ticket.name or out.name, kind="merged",
                               precomputed_hashes=report.tensor_hashes)
        for table in (schema.lineage, schema.lineage_layers):
            c.execute(table.delete().where(table.c.child_model_id == model["model_id"]))
        c.execute(schema.lineage.insert(), lineage_rows(plan, model["model_id"], ticket.run_id))
        layers = layer_rows(plan, model["model_id"], ticket.run_id)
        if layers:
            c.execute(schema.lineage_layers.insert(), layers)
        if reused_from is not None:
            c.execute(schema.reuses.insert().values(
                run_id=ticket.run_id, source_run_id=str(reused_from.get("run_id")),
                source_path=str(reused_from.get("path")),
                linked_files=int(reused_from.get("linked_files", 0)),
                copied_files=int(reused_from.get("copied_files", 0)),
                bytes_copied=int(reused_from.get("bytes_copied", 0))))
        c.execute(schema.runs.update().where(schema.runs.c.run_id == ticket.run_id).values(
            status="COMMITTED", model_id=model["model_id"],
            bytes_read_base=report.bytes_read_base, bytes_read_experts=report.bytes_read_experts,
            bytes_written=report.bytes_written, wall_s=report.wall_s, peak_rss=report.peak_rss,
            finished_at=now()))
    return model


def commit_run(cat: Catalog, plan: Plan, ticket: RunTicket, report: ExecReport,
               name: str | None = None) -> ApplyResult:
    """Card and manifest into the staging folder, then :func:`land_run`."""
    if name:
        ticket.name = name
    check_name(cat, Path(ticket.out), ticket.name)  # before anything lands at --out
    crash_point("before_manifest")
    staging = Path(ticket.staging)
    if not (staging / CARD).exists():
        write_card(cat, plan, ticket.run_id, staging)
    write_manifest(staging, plan, ticket.run_id, ticket.name, report)
    crash_point("after_manifest")
    return land_run(cat, plan, ticket, report)


def land_run(cat: Catalog, plan: Plan, ticket: RunTicket, report: ExecReport,
             reused_from: dict[str, Any] | None = None) -> ApplyResult:
    """Rename a complete staging folder (manifest written) onto --out and record it."""
    _swap_into_place(ticket)
    crash_point("after_rename")
    model = record_commit(cat, plan, ticket, report, None, reused_from)
    crash_point("after_commit")
    reuse = reused_from or {}
    return ApplyResult(
        plan_id=plan.plan_id, run_id=ticket.run_id, model=model["name"],
        model_id=model["model_id"], out=ticket.out,
        bytes_read={"base": report.bytes_read_base, "experts": report.bytes_read_experts},
        bytes_written=report.bytes_written, wall_s=report.wall_s, peak_rss=report.peak_rss,
        reused=reused_from is not None, reused_from=reuse.get("path"),
        linked_files=reuse.get("linked_files", 0), copied_files=reuse.get("copied_files", 0),
        io_budget=plan.io_budget, error_bound=plan.error_bound,
        error_bound_kind=plan.error_bound_kind, phases=report.phases)


def committed_result(cat: Catalog, plan: Plan, out: str | Path | None = None
                     ) -> ApplyResult | None:
    """An existing commit of this plan whose output is still in place, if any:
    the one at ``out`` when there is one there, else the newest."""
    r, m = schema.runs, schema.models
    rows = cat.rows(sa.select(r, m.c.name).join(m, m.c.model_id == r.c.model_id).where(
        r.c.plan_id == plan.plan_id, r.c.status == "COMMITTED").order_by(r.c.finished_at.desc()))
    rows = [row for row in rows
            if read_manifest(Path(row["out_path"])).get("plan_id") == plan.plan_id]
    if out is not None:
        here = str(Path(out).expanduser().resolve())
        rows = [row for row in rows if row["out_path"] == here] or rows
    if not rows:
        return None
    row = rows[0]
    return ApplyResult(
        plan_id=plan.plan_id, run_id=row["run_id"], model=row["name"],
        model_id=row["model_id"], out=row["out_path"],
        bytes_read={"base": 0, "experts": 0}, bytes_written=0, wall_s=0.0,
        peak_rss=0, reused=True, io_budget=plan.io_budget,
        error_bound=plan.error_bound, error_bound_kind=plan.error_bound_kind)

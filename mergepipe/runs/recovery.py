"""After a crash: finish the runs whose output landed intact, undo the others."""
from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog, now
from mergepipe.engine.execute import ExecReport
from mergepipe.files import pid_alive
from mergepipe.planner.records import load_plan
from mergepipe.runs.manifest import read_manifest, verify_dir
from mergepipe.runs.transaction import RunTicket, record_commit, staging_path, trash_path


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
        manifest = read_manifest(out)
        landed = manifest.get("run_id") == run["run_id"]
        if landed and verify_dir(out).ok:
            plan = load_plan(cat, run["plan_id"])
            rep = ExecReport(plan.plan_id, {}, 0, 0, sum(manifest["files"].values()), 0.0, 0,
                             manifest["tensors"], manifest["files"])
            ticket = RunTicket(run["run_id"], plan.plan_id, str(out), str(staging),
                               name=manifest.get("name"))
            record_commit(cat, plan, ticket, rep, None, manifest.get("reused_from"))
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


def _alive_here(run: dict[str, Any]) -> bool:
    """A run owned by another live process of this host (not this one)."""
    if run.get("host") != socket.gethostname() or not run.get("pid") or run["pid"] == os.getpid():
        return False
    return pid_alive(run["pid"])

"""Apply a plan that is already committed elsewhere: materialise that commit at the
new --out instead of merging again.

The committed files are hard-linked into a staging folder beside --out (copied
where the file system refuses links, e.g. across devices), a manifest of the
new run is written, the folder is verified against it, and it lands through
the same rename and catalog transaction as any commit. Hard links share their
data with the first output: tools that rewrite files (as the merge does) are
unaffected, but editing a shard in place would change both.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergepipe.catalog.store import Catalog
from mergepipe.engine.execute import ExecReport
from mergepipe.engine.faults import crash_point
from mergepipe.errors import MergePipeError
from mergepipe.files import fsync_dir, safe_relpath
from mergepipe.planner.plan import Plan
from mergepipe.runs.card import CARD, write_card
from mergepipe.runs.manifest import MANIFEST, read_manifest, verify_dir, write_manifest
from mergepipe.runs.transaction import (ApplyResult, abort_run, begin_run, check_name,
                                        land_run)

# errors of os.link that mean "not here", so a copy is made instead
NO_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP,
           errno.EOPNOTSUPP, errno.ENOSYS}


class NotReusable(MergePipeError):
    """The existing commit cannot stand in for a merge (its files no longer match)."""


@dataclass
class Materialized:
    linked_files: int = 0
    copied_files: int = 0
    bytes_copied: int = 0


def link_or_copy(src: Path, dst: Path, done: Materialized) -> None:
    """Hard-link ``src`` at ``dst``, or copy it (fsynced) where links are refused."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
        done.linked_files += 1
        return
    except OSError as exc:
        if exc.errno not in NO_LINK:
            raise
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    done.copied_files += 1
    done.bytes_copied += dst.stat().st_size


def _listed_files(source: Path, manifest: dict[str, Any]) -> list[str]:
    """Every file the source commit's manifest lists, each a plain file inside it."""
    try:
        rels = sorted(set(manifest["files"]) | set(manifest["side_files"]))
    except (KeyError, TypeError):
        raise NotReusable(f"{source / MANIFEST} lists no files")
    for rel in rels:
        f = source / rel if safe_relpath(rel) else None
        if f is None or f.is_symlink() or not f.is_file():
            raise NotReusable(f"{source}: {rel!r} is missing or not a plain file")
    return rels


def reuse_commit(cat: Catalog, plan: Plan, source: ApplyResult, out: str | Path,
                 name: str | None = None, overwrite: bool = False,
                 device: str = "cpu") -> ApplyResult:
    """Commit ``plan`` at ``out`` from the files of its existing commit ``source``.

    Raises :class:`NotReusable`, leaving nothing behind, when those files do not
    verify; the caller then merges from the inputs.
    """
    started = time.perf_counter()
    src, target = Path(source.out), Path(out).expanduser().resolve()
    if target == src or src in target.parents:
        raise MergePipeError(f"--out {target} lies inside {src}, this plan's commit; choose "
                             f"another output directory")
    manifest = read_manifest(src)
    if manifest.get("plan_id") != plan.plan_id:
        raise NotReusable(f"{src} no longer holds a commit of plan {plan.plan_id[:12]}")
    rels = _listed_files(src, manifest)
    ticket = begin_run(cat, plan, target, overwrite, device=device, name=name or target.name)
    try:
        staging, done = Path(ticket.staging), Materialized()
        for rel in rels:
            link_or_copy(src / rel, staging / rel, done)
        if not (staging / CARD).exists():  # a commit made before cards existed
            write_card(cat, plan, source.run_id, staging)
        fsync_dir(staging)
        reused = {"run_id": source.run_id, "path": str(src), **done.__dict__}
        report = ExecReport(plan.plan_id, {}, 0, 0, done.bytes_copied,
                            time.perf_counter() - started, 0, dict(manifest.get("tensors", {})),
                            dict(manifest["files"]), device)
        check_name(cat, target, ticket.name)
        crash_point("before_manifest")
        write_manifest(staging, plan, ticket.run_id, ticket.name, report, reused)
        crash_point("after_manifest")
        check = verify_dir(staging)
        if not check.ok:
            raise NotReusable(f"{src} does not match its manifest ({check.problems[0]})")
        report.wall_s = time.perf_counter() - started
        return land_run(cat, plan, ticket, report, reused)
    except BaseException:
        abort_run(cat, ticket)
        raise

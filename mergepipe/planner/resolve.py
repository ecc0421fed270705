"""Model references in specs and commands: a catalog name, a model directory, or a
Hugging Face hub id (``org/name[@revision]``), registered on first use.

An existing directory wins over a hub id of the same spelling. A directory is
known by its real path; one whose folder name another model holds gets a longer
unique name (see :func:`mergepipe.catalog.register.default_names`), said once on
stderr when it is registered.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mergepipe.catalog.register import register_model
from mergepipe.catalog.store import Catalog
from mergepipe.errors import BadCheckpointError, MergePipeError, SpecError
from mergepipe.planner.hub import HubSnapshot, fetch_snapshot, parse_hub_ref


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_model(cat: Catalog, ref: str) -> dict[str, Any]:
    """A catalog name, else a directory, else a hub id; registered when new (and
    remembered in ``cat.fresh_models`` so a failed plan can forget it again)."""
    m = cat.model_by_name(ref)
    if m is not None:
        return m
    found = locate(ref)
    if found is None:
        raise SpecError(f"model {ref!r} is neither a catalog name, a model directory nor a "
                        f"hub id (org/name[@revision])")
    known = cat.model_by_path(found[0])
    if known is not None:
        return known
    row = _register(cat, *found)
    cat.fresh_models.append(row["model_id"])
    return row


def resolve_all(cat: Catalog, refs: list[str]) -> list[dict[str, Any]]:
    """:func:`resolve_model` for several references, all or nothing: when one fails,
    the models the others registered on the way are forgotten again."""
    before = len(cat.fresh_models)
    try:
        return [resolve_model(cat, ref) for ref in refs]
    except BaseException:
        for model_id in cat.fresh_models[before:]:
            cat.delete_model(model_id)
        del cat.fresh_models[before:]
        raise


def register_ref(cat: Catalog, ref: str | Path, name: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """`mergepipe register REF`: index a model directory or a hub id now.

    An explicit ``name`` that another model holds fails; without one a taken
    folder name is replaced by a longer unique one."""
    found = locate(str(ref))
    if found is None:
        raise MergePipeError(f"{ref} is a file, not a model directory" if Path(ref).exists()
                             else f"model directory {ref} does not exist (nor is it a hub id "
                                  f"org/name[@revision])")
    return _register(cat, *found, name=name, progress=progress)


def locate(ref: str) -> tuple[Path, HubSnapshot | None] | None:
    """Where a reference's files are: an existing directory, else the cached (or
    downloaded) snapshot of a hub id; None when it is neither."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve(), None
    hub = parse_hub_ref(ref)
    if hub is None:
        return None
    snapshot = fetch_snapshot(hub)
    return snapshot.path, snapshot


def _register(cat: Catalog, path: Path, snapshot: HubSnapshot | None, name: str | None = None,
              progress: bool = False) -> dict[str, Any]:
    if snapshot is None:
        return register_model(cat, path, name=name, progress=progress, notify=_stderr)
    try:
        return register_model(cat, path, name=name, progress=progress, notify=_stderr,
                              repo_id=snapshot.repo_id, revision=snapshot.revision)
    except BadCheckpointError as exc:  # say which hub model, not only its snapshot folder
        raise BadCheckpointError(f"hub model {snapshot.repo_id!r} (revision "
                                 f"{snapshot.revision[:12]}): {exc}") from None

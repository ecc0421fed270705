"""Model references in specs: a catalog name, or a model directory registered on first use."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mergepipe.catalog.register import register_model
from mergepipe.catalog.store import Catalog
from mergepipe.errors import SpecError


def resolve_model(cat: Catalog, ref: str) -> dict[str, Any]:
    """A catalog name, or a directory registered on the fly."""
    m = cat.model_by_name(ref)
    if m is not None:
        return m
    p = Path(ref).expanduser()
    if p.is_dir():
        known = cat.model_by_path(p)
        if known is not None:
            return known
        row = register_model(cat, p)
        cat.fresh_models.append(row["model_id"])
        return row
    raise SpecError(f"model {ref!r} is neither a catalog name nor a model directory")

"""The model card (``README.md``) a merged model carries, so that the folder says
what it is wherever it is copied or uploaded.

The YAML front matter holds what a model hub indexes (``base_model``, tags,
library); the body names the parents, the method, the plan and the run that
wrote the weights, and the merge configuration. The card names no catalog
model, so a reuse of the commit at another folder can link it unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mergepipe.catalog.store import Catalog
from mergepipe.planner.plan import Plan, Source
from mergepipe.text import human_bytes

CARD = "README.md"


def _hub_ref(source: Source, row: dict[str, Any]) -> str:
    """How a hub or a reader finds a parent: its hub id if it came from one, else its path."""
    return row.get("repo_id") or source.path or source.key


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def card_text(cat: Catalog, plan: Plan, run_id: str) -> str:
    """The card of a commit of ``plan`` by run ``run_id``."""
    rows = {s.model_id: (cat.model_by_id(s.model_id) or {}) for s in plan.sources}
    base = next((s for s in plan.sources if s.role == "base"), None)
    parents = [s for s in plan.sources if s is not base]
    refs = [_hub_ref(s, rows[s.model_id]) for s in plan.sources]
    meta = {"base_model": _hub_ref(base, rows[base.model_id]) if base else refs,
            "base_model_relation": "merge",
            "tags": ["merge", "mergepipe"],
            "library_name": "transformers"}
    title = f"{plan.method} merge of {', '.join(s.key for s in parents)}" + \
        (f" onto {base.key}" if base else "")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---",
             f"# {title}", "",
             f"This model was merged with MergePipe using the `{plan.method}` method.", "",
             "## Parents", "",
             "| parent | source | revision | role |", "|---|---|---|---|"]
    for s in plan.sources:
        row = rows[s.model_id]
        lines.append(f"| {_cell(s.key)} | {_cell(_hub_ref(s, row))} | "
                     f"{_cell(row.get('revision') or '-')} | {s.role} |")
    budget = "none (exact merge)" if plan.io_budget is None else \
        f"{human_bytes(plan.io_budget)} of expert reads"
    if plan.io_budget is not None and plan.error_bound is not None:
        budget += f", error bound {plan.error_bound:.4g} ({plan.error_bound_kind})"
    config = yaml.safe_dump(json.loads(json.dumps(plan.spec, default=str)), sort_keys=False)
    lines += ["", "## Merge", "",
              f"- method: `{plan.method}`",
              f"- plan: `{plan.plan_id}`",
              f"- run: `{run_id}` (the run that wrote these weights)",
              f"- I/O budget: {budget}", "",
              "Per-layer parameters: `mergepipe sql \"SELECT * FROM lineage_layers_view "
              f"WHERE plan_id = '{plan.plan_id}'\"`.", "",
              "## Configuration", "",
              "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(cat: Catalog, plan: Plan, run_id: str, folder: Path) -> None:
    """Write the card into a staging folder (before its manifest, which then lists it)."""
    (folder / CARD).write_text(card_text(cat, plan, run_id))

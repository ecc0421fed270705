"""Assemble a search's layer prior from the catalog and the two checkpoints, once.

The result is stored in ``searches.prior_json`` (per-layer measurements,
the probe prompts' source and digests, importance and lengthscales per
coordinate), so a resumed search reuses it and a user can inspect it in SQL.
"""
from __future__ import annotations

from typing import Any

from mergepipe.catalog.store import Catalog
from mergepipe.search import trials
from mergepipe.search.config import SearchConfig
from mergepipe.search.prior import LayerPrior, lengthscales_from_importance
from mergepipe.search.source_diff import (activation_diff, describe_probe,
                                          param_diff_from_checkpoints, param_diff_from_stats,
                                          probe_prompts)
from mergepipe.search.space import LayerSpace


def measure_prior(cat: Catalog, base: dict[str, Any], reasoning: dict[str, Any],
                  space: LayerSpace, cfg: SearchConfig) -> dict[str, Any]:
    """Both signals per layer, combined, and reduced to the search's coordinates."""
    layers = space.num_layers
    param = param_diff_from_stats(cat, reasoning["model_id"], base["model_id"], layers)
    source = "block_stats"
    if param is None:
        param = param_diff_from_checkpoints(base["path"], reasoning["path"], layers)
        source = "checkpoints"
    probe = cfg.probe_path()
    prompts = probe_prompts(probe, cfg.probe_n, exclude=cfg.tasks)
    act = activation_diff(base["path"], reasoning["path"], prompts, layers)
    prior = LayerPrior(param[0], act[0], param[1], act[1], param_source=source,
                       probe=describe_probe(probe, prompts))
    importance = space.reduce_per_layer(prior.importance_layers, prior.importance_head)
    return {**prior.to_json(), "coords": space.names(), "importance": importance,
            "lengthscales": lengthscales_from_importance(importance)}


def ensure_prior(cat: Catalog, search_id: str, row: dict[str, Any], base: dict[str, Any],
                 reasoning: dict[str, Any], space: LayerSpace,
                 cfg: SearchConfig) -> dict[str, Any]:
    if row.get("prior"):
        return row["prior"]
    doc = measure_prior(cat, base, reasoning, space, cfg)
    trials.update_search(cat, search_id, prior=doc)
    return doc

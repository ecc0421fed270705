"""`mergepipe demo`: the main job on the tiny world, end to end.

Library calls only (register, plan, apply, evaluate, SQL), the same ones a
user's script or the search layer makes; the CLI command is a thin wrapper.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mergepipe import api
from mergepipe.text import format_rows

# Early layers stay close to base, later layers lean to reasoning: a layer-wise
# mix that lands between the two models on both accuracy and tokens.
DEMO_LAYER_RAMP = (0.5, 0.8)

# the latest accuracy of each parent: a demo run twice records every evaluation twice
LINEAGE_SQL = """SELECT l.child, l.parent, l.role, l.weights, l.method,
       (SELECT e.value FROM evaluations_view e
        WHERE e.model = l.parent AND e.metric = 'accuracy' AND e.task = '{task}'
        ORDER BY e.created_at DESC LIMIT 1) AS parent_accuracy
FROM lineage_view l
WHERE l.child = '{child}'
ORDER BY l.role"""


def layer_ramp(num_layers: int, lo: float, hi: float) -> list[float]:
    if num_layers == 1:
        return [round((lo + hi) / 2, 4)]
    return [round(lo + (hi - lo) * i / (num_layers - 1), 4) for i in range(num_layers)]


def demo_spec(base: str, reasoning: str, num_layers: int) -> dict[str, Any]:
    """A mergekit-style layer-wise task-arithmetic spec (exact layer indices)."""
    ramp = layer_ramp(num_layers, *DEMO_LAYER_RAMP)
    return {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
            "models": [{"model": reasoning,
                        "parameters": {"weight": {"layers": ramp, "default": ramp[-1]}}}]}


def register_named(cat: api.Catalog, path: Path, name: str) -> dict[str, Any]:
    """Register under `name`, or a key-suffixed name if an older world holds it."""
    holder = cat.model_by_name(name)
    if holder is not None and holder["path"] != str(path.resolve()):
        name = f"{name}-{path.parent.name.rsplit('-', 1)[-1]}"
    return api.register(cat, path, name=name)


def run_demo(home: str | None = None, catalog_url: str | None = None, size: str = "default",
             device: str = "auto", echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the demo in the workspace ``home`` (or the catalog at ``catalog_url``);
    returns the evaluation rows of base, reasoning and merged."""
    echo(f"1. world ({size}): building or reusing the cached base / reasoning pair")
    world = Path(api.world_build(size, log=True)["dir"])
    task = f"world-{size}"
    echo(f"   {world}")
    with api.open_catalog(home, catalog_url) as cat:
        base = register_named(cat, world / "base", f"world-{size}-base")
        reasoning = register_named(cat, world / "reasoning", f"world-{size}-reasoning")
        echo(f"2. registered {base['name']} and {reasoning['name']} "
             f"({base['num_params']:,} params, {base['num_layers']} layers each)")
        spec = demo_spec(base["name"], reasoning["name"], int(base["num_layers"]))
        plan = api.build_plan(cat, spec)
        echo(f"3. planned layer-wise task arithmetic {plan.plan_id[:12]}: reasoning weight per "
             f"layer {json.dumps(spec['models'][0]['parameters']['weight']['layers'])}")
        out = api.workspace_home(home) / "demo" / f"world-{size}-merged"
        res = api.apply_plan(cat, plan, out, name=f"world-{size}-merged-{plan.plan_id[:8]}",
                             overwrite=True)
        merged = cat.require_model(res.model)
        echo(f"4. applied run {res.run_id[:12]} -> {res.out} "
             f"({sum(res.bytes_read.values()):,} bytes read, {res.bytes_written:,} written)")
        echo("5. evaluating on the held-out problems (greedy decoding)")
        rows = []
        for m in (base, reasoning, merged):
            _, r = api.evaluate(cat, m["name"], task, device=device)
            rows.append({"model": m["name"], "accuracy": round(r.accuracy, 4),
                         "mean_tokens": round(r.mean_tokens, 2), "n": r.n,
                         "eval_s": round(r.wall_s, 2)})
        echo(format_rows(rows))
        sql = LINEAGE_SQL.format(task=task, child=merged["name"])
        echo("6. lineage of the merged model, by SQL (mergepipe sql \"…\"):")
        echo("   " + sql.replace("\n", "\n   "))
        echo(format_rows(api.run_sql(cat, sql)))
    return rows

"""Uniform interpolation sweep on the tiny world, through plan/apply.

For x = 0, 0.1, …, 1 it plans and applies `base + x·(reasoning − base)` (task
arithmetic with one weight for every tensor), evaluates the merged model on
the world's held-out split, and prints a table and one JSON document. It also
checks the property the search layer relies on: some intermediate mixes are
non-dominated and strictly between the endpoints on both accuracy and tokens.

    python bench/world_sweep.py [--size default] [--work DIR] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from harness import machine

from mergepipe import api
from mergepipe.cli.common import format_rows
from mergepipe.evaluate import evaluate_model, load_task
from mergepipe.world import ensure_world


def non_dominated(rows: list[dict]) -> list[bool]:
    """Higher accuracy and fewer tokens are both better."""
    out = []
    for r in rows:
        beaten = any(o["accuracy"] >= r["accuracy"] and o["mean_tokens"] <= r["mean_tokens"]
                     and (o["accuracy"] > r["accuracy"] or o["mean_tokens"] < r["mean_tokens"])
                     for o in rows)
        out.append(not beaten)
    return out


def strictly_between(r: dict, base: dict, reasoning: dict) -> bool:
    lo_a, hi_a = sorted((base["accuracy"], reasoning["accuracy"]))
    lo_t, hi_t = sorted((base["mean_tokens"], reasoning["mean_tokens"]))
    return lo_a < r["accuracy"] < hi_a and lo_t < r["mean_tokens"] < hi_t


def sweep(size: str, work: Path, xs: list[float], device: str = "cpu") -> dict:
    world = ensure_world(size, log=True)
    task = load_task(world / "test.jsonl", name=f"world-{size}", split="test")
    rows = []
    with api.open_catalog(work) as cat:
        base = api.register(cat, world / "base", name=f"world-{size}-base")
        reasoning = api.register(cat, world / "reasoning", name=f"world-{size}-reasoning")
        for x in xs:
            spec = {"merge_method": "task_arithmetic", "base_model": base["name"],
                    "dtype": "float32",
                    "models": [{"model": reasoning["name"], "parameters": {"weight": x}}]}
            t0 = time.perf_counter()
            plan = api.build_plan(cat, spec)
            res = api.apply_plan(cat, plan, work / f"x{x:.2f}", name=f"sweep-x{x:.2f}")
            merge_s = time.perf_counter() - t0
            ev = evaluate_model(res.out, task, device=device)
            model = cat.require_model(res.model)
            cat.record_evaluation(model["model_id"], ev.task, ev.metrics(), ev.n, ev.backend,
                                  split=ev.split, wall_s=ev.wall_s)
            rows.append({"x": round(x, 2), "accuracy": round(ev.accuracy, 4),
                         "mean_tokens": round(ev.mean_tokens, 2), "n": ev.n,
                         "merge_s": round(merge_s, 2), "eval_s": round(ev.wall_s, 2)})
            print(format_rows([rows[-1]]).splitlines()[2], file=sys.stderr, flush=True)
    front = non_dominated(rows)
    ends = {r["x"]: r for r in rows}
    between = [r["x"] for r, nd in zip(rows, front)
               if nd and 0 < r["x"] < 1 and 0.0 in ends and 1.0 in ends
               and strictly_between(r, ends[0.0], ends[1.0])]
    for r, nd in zip(rows, front):
        r["pareto"] = nd
    return {"size": size, "world": str(world), "n": len(task.items), "rows": rows,
            "intermediate_non_dominated": between, "trade_off_ok": len(between) >= 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=["test", "default"])
    ap.add_argument("--work", type=Path, help="Workspace for the catalog and merged models "
                    "(default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=10, help="x in {0, 1/steps, …, 1}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--md-out", type=Path, help="Also write the table as markdown here.")
    args = ap.parse_args()
    xs = [i / args.steps for i in range(args.steps + 1)]
    with tempfile.TemporaryDirectory(prefix="world-sweep-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result = sweep(args.size, work, xs, args.device)
    print(format_rows(result["rows"], columns=["x", "accuracy", "mean_tokens", "n", "merge_s",
                                               "eval_s", "pareto"]))
    print(f"non-dominated mixes strictly between the endpoints: "
          f"{result['intermediate_non_dominated']} -> "
          f"{'OK' if result['trade_off_ok'] else 'DEGENERATE'}")
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    if args.md_out:
        args.md_out.write_text(markdown(result, args))


def markdown(result: dict, args: argparse.Namespace) -> str:
    lines = [f"# Uniform interpolation sweep, {result['size']} world ({result['n']} held-out "
             "problems, greedy decoding, transformers on CPU)\n",
             "`base + x·(reasoning − base)` through plan/apply; time = merge (plan + apply) "
             "and evaluation wall seconds.\n",
             "| x | accuracy | mean tokens | merge s | eval s | non-dominated |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['x']:.2f} | {r['accuracy']:.3f} | {r['mean_tokens']:.2f} | "
                     f"{r['merge_s']:.2f} | {r['eval_s']:.2f} | {'yes' if r['pareto'] else ''} |")
    lines.append(f"\nNon-dominated mixes strictly between the endpoints on both objectives: "
                 f"{result['intermediate_non_dominated']}. Command: `python {' '.join(sys.argv)}`. "
                 f"Machine: {machine()}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

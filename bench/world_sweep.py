"""The tiny world's margins under several CPU instruction sets, with a uniform sweep.

For each `ATEN_CPU_CAPABILITY` asked for, a child process builds the world from
scratch (in a private cache, so no earlier build is reused), scores base and
reasoning on the held-out split, and sweeps `base + x·(reasoning − base)` for
x = 0, 0.1, …, 1 through plan/apply. The report checks what the tests and the
search rely on:

- reasoning at least `acc_gap` more accurate than base and `token_ratio` times
  its mean tokens (test world 0.25 and 3×, default world 0.4 and 4×);
- (default world) at least two non-dominated mixes strictly between the
  sources, each at least 1 token and 0.02 accuracy from its neighbours on the
  front.

    python bench/world_sweep.py --size default --capabilities avx2 avx512 \\
        --md-out bench/results/world_default.md --json-out bench/results/world_default.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine

TARGETS = {"test": {"acc_gap": 0.25, "token_ratio": 3.0, "between": 0},
           "default": {"acc_gap": 0.4, "token_ratio": 4.0, "between": 2}}
MIN_TOKENS, MIN_ACC = 1.0, 0.02  # margins of an intermediate mix to its front neighbours


def non_dominated(rows: list[dict]) -> list[bool]:
    """Higher accuracy and fewer tokens are both better."""
    out = []
    for r in rows:
        beaten = any(o["accuracy"] >= r["accuracy"] and o["mean_tokens"] <= r["mean_tokens"]
                     and (o["accuracy"] > r["accuracy"] or o["mean_tokens"] < r["mean_tokens"])
                     for o in rows)
        out.append(not beaten)
    return out


def separated_mixes(rows: list[dict]) -> list[float]:
    """Non-dominated mixes strictly between the sources (x = 0 and x = 1), each
    at least MIN_TOKENS and MIN_ACC away from both of its neighbours on the front."""
    ends = {r["x"]: r for r in rows}
    base, reasoning = ends[0.0], ends[1.0]
    front = sorted((r for r, nd in zip(rows, non_dominated(rows)) if nd or r in (base, reasoning)),
                   key=lambda r: (r["mean_tokens"], r["accuracy"]))
    lo_a, hi_a = sorted((base["accuracy"], reasoning["accuracy"]))
    lo_t, hi_t = sorted((base["mean_tokens"], reasoning["mean_tokens"]))
    out = []
    for i, r in enumerate(front):
        if r in (base, reasoning) or i == 0 or i == len(front) - 1:
            continue
        if not (lo_a < r["accuracy"] < hi_a and lo_t < r["mean_tokens"] < hi_t):
            continue
        near = (front[i - 1], front[i + 1])
        if all(abs(r["mean_tokens"] - n["mean_tokens"]) >= MIN_TOKENS
               and abs(r["accuracy"] - n["accuracy"]) >= MIN_ACC for n in near):
            out.append(r["x"])
    return out


def measure(size: str, steps: int) -> dict:
    """Build, score and sweep in this process (the capability is the caller's env)."""
    import torch

    from mergepipe import api
    from mergepipe.evaluate import evaluate_model, load_task
    from mergepipe.world import obtain_world

    world, timings = obtain_world(size, rebuild=True)
    task = load_task(world / "test.jsonl", name=f"world-{size}", split="test")
    rows = []
    with tempfile.TemporaryDirectory(prefix="world-sweep-") as tmp, \
            api.open_catalog(Path(tmp) / "ws") as cat:
        base = api.register(cat, world / "base", name="base")
        reasoning = api.register(cat, world / "reasoning", name="reasoning")
        for i in range(steps + 1):
            x = round(i / steps, 4)
            spec = {"merge_method": "task_arithmetic", "base_model": base["name"],
                    "dtype": "float32",
                    "models": [{"model": reasoning["name"], "parameters": {"weight": x}}]}
            res = api.apply_plan(cat, api.build_plan(cat, spec), Path(tmp) / f"x{x}",
                                 name=f"x{x}")
            ev = evaluate_model(res.out, task, device="cpu")
            rows.append({"x": x, "accuracy": round(ev.accuracy, 4),
                         "mean_tokens": round(ev.mean_tokens, 2)})
            print(f"  x={x:.2f} accuracy {ev.accuracy:.3f} tokens {ev.mean_tokens:.2f}",
                  file=sys.stderr, flush=True)
    return {"capability": torch.backends.cpu.get_cpu_capability(), "n": len(task.items),
            "build_s": round(timings.get("total_s", 0.0), 1), "threads": torch.get_num_threads(),
            "rows": rows}


def judge(size: str, result: dict) -> dict:
    """The margins the targets speak of, and whether each is met."""
    ends = {r["x"]: r for r in result["rows"]}
    b, r = ends[0.0], ends[1.0]
    t = TARGETS[size]
    gap = round(r["accuracy"] - b["accuracy"], 4)
    ratio = round(r["mean_tokens"] / b["mean_tokens"], 2)
    between = separated_mixes(result["rows"])
    for row, nd in zip(result["rows"], non_dominated(result["rows"])):
        row["pareto"] = nd
    return {"acc_gap": gap, "token_ratio": ratio, "separated_mixes": between,
            "ok": gap >= t["acc_gap"] and ratio >= t["token_ratio"] and len(between) >= t["between"]}


def markdown(size: str, results: list[dict]) -> str:
    t = TARGETS[size]
    lines = [f"# The {size} world under several CPU instruction sets\n",
             f"Each column set is a fresh build under `ATEN_CPU_CAPABILITY`; accuracy and mean "
             f"generated tokens on the {results[0]['n']} held-out problems (greedy, transformers "
             f"on CPU) of `base + x·(reasoning − base)` applied through plan/apply.\n",
             f"Targets: reasoning ≥ base + {t['acc_gap']}, tokens ≥ {t['token_ratio']}×"
             + (f", ≥ {t['between']} non-dominated mixes strictly between the sources, each "
                f"≥ {MIN_TOKENS:g} token and ≥ {MIN_ACC} accuracy from its front neighbours."
                if t["between"] else ".") + "\n",
             "| capability | build s | base acc | reasoning acc | gap | token ratio | "
             "separated mixes | met |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for res in results:
        ends = {r["x"]: r for r in res["rows"]}
        v = res["verdict"]
        lines.append(f"| {res['capability']} | {res['build_s']} | {ends[0.0]['accuracy']:.3f} | "
                     f"{ends[1.0]['accuracy']:.3f} | {v['acc_gap']:.3f} | {v['token_ratio']:.2f}× "
                     f"| {v['separated_mixes']} | {'yes' if v['ok'] else 'NO'} |")
    lines += ["", "| x | " + " | ".join(f"{r['capability']} acc | tokens" for r in results) + " |",
              "|---:|" + "---:|---:|" * len(results)]
    for i, row in enumerate(results[0]["rows"]):
        cells = []
        for res in results:
            r = res["rows"][i]
            mark = " *" if r.get("pareto") else ""
            cells.append(f"{r['accuracy']:.3f}{mark} | {r['mean_tokens']:.2f}")
        lines.append(f"| {row['x']:.1f} | " + " | ".join(cells) + " |")
    lines.append(f"\n`*` non-dominated. Command: `python {' '.join(sys.argv)}`. "
                 f"Machine: {machine()}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="default", choices=sorted(TARGETS))
    ap.add_argument("--capabilities", nargs="+", default=["avx2", "avx512"],
                    help="ATEN_CPU_CAPABILITY values to build under (default, avx2, avx512)")
    ap.add_argument("--steps", type=int, default=10, help="x in {0, 1/steps, …, 1}")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--md-out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.size, args.steps)))
        return
    results = []
    for cap in args.capabilities:
        print(f"building the {args.size} world under ATEN_CPU_CAPABILITY={cap}", file=sys.stderr,
              flush=True)
        with tempfile.TemporaryDirectory(prefix="world-cache-") as cache:
            env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "MERGEPIPE_CACHE": cache}
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", "--size", args.size,
                                  "--steps", str(args.steps)], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["verdict"] = judge(args.size, res)
        results.append(res)
        print(f"{cap}: {res['verdict']}", file=sys.stderr, flush=True)
    doc = {"size": args.size, "machine": machine(), "command": " ".join(sys.argv),
           "results": results, "ok": all(r["verdict"]["ok"] for r in results)}
    print(json.dumps(doc, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.md_out:
        args.md_out.write_text(markdown(args.size, results))


if __name__ == "__main__":
    main()

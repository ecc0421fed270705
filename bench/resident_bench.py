"""Per-trial overhead of a search evaluator, excluding generation: write-then-load vs resident.

For the same candidate points (the search's shared Sobol design, same seed) it
measures what each evaluator pays before it can generate:

* checkpoint: `execute_plan` into a directory (merge + write), then
  `from_pretrained` of that directory into a fresh model (load);
* resident: `merge_in_memory` of the same plan (merge), then `swap_weights` into a
  model loaded once at start-up (load); the start-up is reported on its own.

It runs on the default tiny world and on a synthetic pair of bench/family.py's
0.6b size (base + one fine-tune-like expert), and checks on the first
candidate that both evaluators end with identical weights.

    python bench/resident_bench.py --candidates 4 --out bench/results
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import REPO, machine

from family import make_family
from mergepipe import api
from mergepipe.catalog.store import open_catalog
from mergepipe.engine.execute import execute_plan
from mergepipe.search.algorithms import sobol_design
from mergepipe.engine.memory import merge_in_memory
from mergepipe.search.resident import swap_weights
from mergepipe.search.space import LayerSpace


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    from mergepipe.evaluate.hf import quiet_transformers
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def measure(label: str, base: Path, reasoning: Path, n: int, seed: int, work: Path) -> dict:
    with open_catalog(work / f"ws-{label}") as cat:
        b = api.register(cat, base, name="base")
        api.register(cat, reasoning, name="reasoning")
        space = LayerSpace(int(b["num_layers"]))
        plans = [api.build_plan(cat, space.to_spec(x.tolist(), "base", "reasoning"))
                 for x in sobol_design(space.dim, n, seed)]
    t0 = time.perf_counter()
    live = _load(base)
    start_s = time.perf_counter() - t0
    rows = []
    tensors = None   # as a resident evaluator does, each merge overwrites the last one's tensors
    for i, plan in enumerate(plans):
        out = work / f"{label}-cand{i}"
        t0 = time.perf_counter()
        report = execute_plan(plan, out)
        t1 = time.perf_counter()
        fresh = _load(out)
        t2 = time.perf_counter()
        tensors = merge_in_memory(plan, into=tensors)
        t3 = time.perf_counter()
        swap_weights(live, tensors)
        t4 = time.perf_counter()
        if i == 0:
            same = all(torch.equal(a, c) for a, c in zip(live.state_dict().values(),
                                                         fresh.state_dict().values()))
            if not same:
                raise SystemExit(f"{label}: resident weights differ from the loaded checkpoint")
        del fresh
        shutil.rmtree(out)
        rows.append({"checkpoint_merge_write_s": t1 - t0, "checkpoint_load_s": t2 - t1,
                     "resident_merge_s": t3 - t2, "resident_swap_s": t4 - t3,
                     "bytes_written": report.bytes_written})
    params = sum(p.numel() for p in live.parameters())
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"label": label, "params": params, "candidates": n, "engine_start_s": start_s,
            "median": med, "trials": rows,
            "checkpoint_s": med["checkpoint_merge_write_s"] + med["checkpoint_load_s"],
            "resident_s": med["resident_merge_s"] + med["resident_swap_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="default")
    ap.add_argument("--family-root", default=str(REPO / "bench" / "out" / "family"))
    ap.add_argument("--family-size", default="0.6b", help="bench/family.py size of the pair")
    ap.add_argument("--out", default=str(REPO / "bench" / "out"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mergepipe.world.build import ensure_world
    world = ensure_world(args.world)
    fam = make_family(args.family_root, args.family_size, experts=1, seed=args.seed)
    results = []
    with tempfile.TemporaryDirectory(dir=Path(args.out).parent if Path(args.out).parent.exists()
                                     else None) as tmp:
        work = Path(tmp)
        results.append(measure(f"world-{args.world}", world / "base", world / "reasoning",
                               args.candidates, args.seed, work))
        results.append(measure(f"synthetic-{args.family_size}", fam.base, fam.experts[0],
                               args.candidates,
                               args.seed, work))
    lines = ["| pair | params | engine start s (once) | checkpoint: merge+write s | load s | "
             "resident: merge s | swap s | overhead ratio | bytes written per trial |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        m = r["median"]
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['engine_start_s']:.2f} | "
                     f"{m['checkpoint_merge_write_s']:.3f} | {m['checkpoint_load_s']:.3f} | "
                     f"{m['resident_merge_s']:.3f} | {m['resident_swap_s']:.3f} | "
                     f"{r['checkpoint_s'] / r['resident_s']:.2f}× | "
                     f"{int(m['bytes_written']):,} vs 0 |")
    text = "\n".join([f"Per-trial evaluator overhead (merge + load, no generation), median of "
                      f"{args.candidates} candidates from the seed-{args.seed} Sobol design, "
                      "float32 engine on CPU, one thread.", ""] + lines + [
        "", f"Machine: {machine()}.", "", "Command: `python " + " ".join(sys.argv) + "`"])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "resident_overhead.md").write_text(text + "\n")
    (out / "resident_overhead.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

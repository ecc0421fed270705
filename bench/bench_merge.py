"""MergePipe against mergekit on the same merges, measured in one run, with the disk's floor.

For each K (number of experts) and method: the page cache is dropped for every
model file, then mergekit runs the full merge, then (cache dropped again)
MergePipe's exact plan, then MergePipe at ``--io-budget`` (its speed-up is
against mergekit's full merge, which has no budget). Each tool is a subprocess:
wall time, peak RSS (VmHWM), physical bytes read (kernel counters). For MergePipe
the engine's per-phase seconds (read, decode, stats, math, encode, queue wait,
write, hash, fsync) come from ``apply --json``. The I/O floor is ``cat`` of the
same input files from a cold cache. Outputs are compared with mergekit's
(max-abs and relative deviation), so a speed number never hides a wrong answer.
Models are bf16 and so is the output (``--dtype``); mergekit computes in that
dtype, MergePipe in float32, so the two differ by bf16 rounding. Threads are
each tool's default unless BENCH_THREADS is set. Registration (one full hash of
every model) is a one-time catalog cost, reported apart.

    python bench/bench_merge.py --size 0.6b --experts 8 16
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from family import make_family  # noqa: E402
from harness import (MERGEKIT_ENV, THREAD_ENV, compare_models, dir_bytes, drop_cache,  # noqa: E402
                     gib, io_floor, machine, merge_config, mergekit_cmd, mergepipe_cmd,
                     run_measured)

PARAMS = {"ties": {"weight": 1.0, "density": 0.5}, "task_arithmetic": None, "sce": {}}
MERGE_WIDE = {"sce": {"select_topk": 0.5}}
PHASES = ("read", "read_ahead", "verify", "decode", "stats", "math", "encode", "queue_wait", "write",
          "hash", "fsync")


def register_all(home: Path, models: list[Path]) -> dict[str, float]:
    """Register each model (a no-op when already registered); time each cold."""
    out = {}
    for m in models:
        drop_cache(m)
        res = run_measured(mergepipe_cmd(home, "register", m, "--name", m.name))
        out[m.name] = round(res["wall_s"], 2)
    return out


def analyze_all(home: Path, base: Path, experts: list[Path]) -> float:
    """Block statistics for budgeted plans: a one-time catalog cost (skipped when current),
    kept out of the timed budget merges."""
    drop_cache(base, *experts)
    res = run_measured(mergepipe_cmd(home, "analyze", *[e.name for e in experts],
                                     "--base", base.name))
    return round(res["wall_s"], 2)


def _mergepipe(home: Path, cfg: Path, out: Path, models: list[Path], *extra: str) -> dict:
    drop_cache(*models)
    res = run_measured(mergepipe_cmd(home, "apply", cfg, "--out", out, "--json", *extra))
    info = json.loads(res["stdout"].strip().splitlines()[-1])
    if info.get("reused"):   # a copy of an earlier commit of this plan, not a merge
        raise SystemExit(f"{out}: apply reused the commit at {info.get('reused_from')}; "
                         f"delete that output so the plan is merged again")
    return {"wall_s": res["wall_s"], "peak_rss": res["peak_rss"], "read_bytes": res["read_bytes"],
            "bytes_written": info["bytes_written"], "reader_base": info["bytes_read"]["base"],
            "reader_experts": info["bytes_read"]["experts"], "engine_wall_s": info["wall_s"],
            "phases": info.get("phases", {}), "loadavg_1m": res["loadavg_1m"]}


def one_method(method: str, base: Path, experts: list[Path], home: Path, work: Path,
               dtype: str, budget: str | None, peer: bool = True) -> dict:
    k = len(experts)
    params = PARAMS[method] if PARAMS[method] is not None else {"weight": round(1.0 / k, 6)}
    cfg = work / f"{method}-K{k}.yml"
    cfg.write_text(merge_config(method, base, experts, dtype=dtype,
                                merge_wide=MERGE_WIDE.get(method), **params))
    models = [base, *experts]
    outs = {t: work / f"{t}-{method}-K{k}" for t in ("mergekit", "exact", "budget")}
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
    rows: dict[str, dict] = {}
    if peer:
        drop_cache(*models)
        mk = run_measured(mergekit_cmd(cfg, outs["mergekit"]), env=MERGEKIT_ENV)
        rows["mergekit"] = {"wall_s": mk["wall_s"], "peak_rss": mk["peak_rss"],
                            "read_bytes": mk["read_bytes"],
                            "bytes_written": dir_bytes(outs["mergekit"]),
                            "loadavg_1m": mk["loadavg_1m"]}
    rows["mergepipe"] = _mergepipe(home, cfg, outs["exact"], models)
    if peer:
        rows["mergepipe"].update(_compare(outs["exact"], outs["mergekit"], base))
    shutil.rmtree(outs["exact"], ignore_errors=True)   # room for the next output at scale
    if budget:
        rows[f"mergepipe {budget}"] = _mergepipe(home, cfg, outs["budget"], models,
                                                 "--io-budget", budget)
        if peer:
            rows[f"mergepipe {budget}"].update(_compare(outs["budget"], outs["mergekit"], base))
    for d in outs.values():
        shutil.rmtree(d, ignore_errors=True)
    for tool, v in rows.items():
        v["speedup"] = rows["mergekit"]["wall_s"] / v["wall_s"] if peer else None
    return {"method": method, "experts": k, "params": params, "merge_wide": MERGE_WIDE.get(method),
            "tools": rows}


def _compare(ours: Path, theirs: Path, base: Path) -> dict:
    c = compare_models(ours, theirs, base)
    return {"max_abs_vs_mergekit": c["max_abs"],
            "dev_vs_merge_delta": c["fro_diff"] / c["delta_fro"] if c["delta_fro"] else 0.0}


def table(results: list[dict], floors: dict[int, dict]) -> str:
    lines = ["| K | method | tool | wall s | peak RSS GiB | read GiB (physical) | "
             "speed-up vs mergekit | ‖ours − mergekit‖ / ‖merged Δ‖ |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for k, f in sorted(floors.items()):
        lines.append(f"| {k} | – | I/O floor (`cat`, cold) | {f['wall_s']:.1f} | – | "
                     f"{gib(f['read_bytes'])} | – | – |")
    for r in results:
        for tool, v in r["tools"].items():
            dev = f"{v['dev_vs_merge_delta']:.2e}" if "dev_vs_merge_delta" in v else ""
            sp = f"{v['speedup']:.2f}×" if tool != "mergekit" and v["speedup"] else ""
            lines.append(f"| {r['experts']} | {r['method']} | {tool} | {v['wall_s']:.1f} | "
                         f"{gib(v['peak_rss'])} | {gib(v['read_bytes'])} | {sp} | {dev} |")
    return "\n".join(lines)


def phase_table(results: list[dict]) -> str:
    lines = ["| K | method | run | " + " | ".join(PHASES) + " | re-read GiB | threads |",
             "|---:|---|---|" + "---:|" * (len(PHASES) + 2)]
    for r in results:
        for tool, v in r["tools"].items():
            ph = v.get("phases")
            if not ph:
                continue
            cells = " | ".join(f"{ph.get(p, 0):.1f}" for p in PHASES)
            lines.append(f"| {r['experts']} | {r['method']} | {tool} | {cells} | "
                         f"{gib(ph.get('reread_bytes', 0))} | {ph.get('threads', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.6b")
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", default="10%", help="MergePipe's --io-budget row ('' for none)")
    ap.add_argument("--no-peer", nargs="*", default=[], metavar="METHOD",
                    help="methods for which mergekit is not run (at scale it would take too long)")
    ap.add_argument("--work", default="bench/out")
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    fam = make_family(work / "family", args.size, max(args.experts))
    # its own workspace: DuckDB allows one writer, and the budget bench may run alongside
    home = work / f"ws-{args.size}-merge"
    t0 = time.perf_counter()
    reg = register_all(home, [fam.base, *fam.experts])
    analyze_s = analyze_all(home, fam.base, fam.experts[:max(args.experts)]) if args.budget else 0.0
    results, floors = [], {}
    for k in args.experts:
        experts = fam.experts[:k]
        floors[k] = io_floor(fam.base, *experts)
        results += [one_method(m, fam.base, experts, home, work, args.dtype, args.budget or None,
                               peer=m not in args.no_peer)
                    for m in args.methods]
    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    doc = {"size": args.size, "params": fam.params, "experts": args.experts, "dtype": args.dtype,
           "threads": THREAD_ENV.get("OMP_NUM_THREADS", "default"), "machine": machine(),
           "command": command, "register_s": reg, "analyze_s": analyze_s, "io_floor": floors, "results": results,
           "total_s": time.perf_counter() - t0}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"merge_{args.size.replace('.', '_')}_K{'-'.join(map(str, args.experts))}"
    if args.methods != ap.get_default("methods"):   # keep the default table apart
        stem += "_" + "-".join(args.methods)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    loads = [v["loadavg_1m"] for r in results for v in r["tools"].values()]
    md = (f"# MergePipe vs mergekit, {args.size} ({fam.params / 1e6:.0f}M params), "
          f"K={', '.join(map(str, args.experts))}, {args.dtype} models and output, "
          f"cold page cache\n\n{table(results, floors)}\n\n"
          f"## MergePipe engine seconds per phase\n\nwrite and hash run on background "
          f"threads and overlap the rest; stats is the math of the statistics passes of "
          f"streamed sparsifying methods.\n\n{phase_table(results)}\n\n"
          f"Machine: {doc['machine']}; 1-min load average at the start of each run "
          f"{min(loads):.1f}–{max(loads):.1f} (the machine is shared with other jobs: "
          f"timings are noisy). Threads: {doc['threads']}. Command: `{command}`.\n\n"
          f"One-time registration (s, cold): {json.dumps(reg)}\n\n"
          f"One-time `analyze` of the experts against the base (block statistics for "
          f"budgeted plans, s, cold; not in the budget rows): {analyze_s}\n")
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

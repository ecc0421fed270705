"""The same TIES / task-arithmetic merge with MergePipe and mergekit, measured in one run.

For each method: page cache dropped for every model file, then mergekit, then
(cache dropped again) MergePipe's exact plan, each as a subprocess. Reported
per tool: wall time, peak RSS, physical bytes read (kernel counters), bytes
written, and for MergePipe its reader's own per-source counts. The outputs are
compared (max-abs difference) so a speed number never hides a wrong answer.
Registration (one full hash of every model) is a one-time catalog cost and is
reported separately.

    python bench/bench_merge.py --size 0.6b --experts 8
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
from harness import (MERGEKIT_ENV, compare_models, dir_bytes, drop_cache, gib,  # noqa: E402
                     merge_config, mergekit_cmd, mergepipe_cmd, run_measured)

PARAMS = {"ties": {"weight": 1.0, "density": 0.5}, "task_arithmetic": None}


def register_all(home: Path, models: list[Path]) -> dict[str, float]:
    """Register each model (a no-op when already registered); time each cold."""
    out = {}
    for m in models:
        drop_cache(m)
        res = run_measured(mergepipe_cmd(home, "register", m, "--name", m.name))
        out[m.name] = round(res["wall_s"], 2)
    return out


def one_method(method: str, base: Path, experts: list[Path], home: Path, work: Path) -> dict:
    k = len(experts)
    params = PARAMS[method] or {"weight": round(1.0 / k, 6)}
    cfg = work / f"{method}-K{k}.yml"
    cfg.write_text(merge_config(method, base, experts, **params))
    rows = {}
    mk_out, mp_out = work / f"mk-{method}", work / f"mp-{method}"
    for d in (mk_out, mp_out):
        shutil.rmtree(d, ignore_errors=True)
    drop_cache(base, *experts)
    mk = run_measured(mergekit_cmd(cfg, mk_out), env=MERGEKIT_ENV)
    rows["mergekit"] = {"wall_s": mk["wall_s"], "peak_rss": mk["peak_rss"],
                        "read_bytes": mk["read_bytes"], "bytes_written": dir_bytes(mk_out)}
    drop_cache(base, *experts)
    mp = run_measured(mergepipe_cmd(home, "apply", cfg, "--out", mp_out, "--json"))
    info = json.loads(mp["stdout"].strip().splitlines()[-1])
    rows["mergepipe"] = {"wall_s": mp["wall_s"], "peak_rss": mp["peak_rss"],
                         "read_bytes": mp["read_bytes"], "bytes_written": info["bytes_written"],
                         "reader_base": info["bytes_read"]["base"],
                         "reader_experts": info["bytes_read"]["experts"],
                         "engine_wall_s": info["wall_s"]}
    parity = compare_models(mp_out, mk_out)
    for d in (mk_out, mp_out):
        shutil.rmtree(d, ignore_errors=True)
    return {"method": method, "experts": k, "params": params, "tools": rows,
            "max_abs_diff_vs_mergekit": parity["max_abs"], "rel_dev_vs_mergekit": parity["rel_dev"],
            "speedup": rows["mergekit"]["wall_s"] / rows["mergepipe"]["wall_s"],
            "rss_ratio": rows["mergekit"]["peak_rss"] / rows["mergepipe"]["peak_rss"]}


def table(results: list[dict]) -> str:
    lines = ["| method | tool | wall s | peak RSS GiB | read GiB (physical) | written GiB | "
             "speed-up | max-abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for tool, v in r["tools"].items():
            sp = f"{r['speedup']:.2f}×" if tool == "mergepipe" else ""
            diff = f"{r['max_abs_diff_vs_mergekit']:.2e}" if tool == "mergepipe" else ""
            lines.append(f"| {r['method']} | {tool} | {v['wall_s']:.1f} | {gib(v['peak_rss'])} | "
                         f"{gib(v['read_bytes'])} | {gib(v['bytes_written'])} | {sp} | {diff} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.6b")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"])
    ap.add_argument("--work", default="bench/out")
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    fam = make_family(work / "family", args.size, args.experts)
    experts = fam.experts[:args.experts]
    # its own workspace: DuckDB allows one writer, and the budget bench may run alongside
    home = work / f"ws-{args.size}-merge"
    t0 = time.perf_counter()
    reg = register_all(home, [fam.base, *experts])
    results = [one_method(m, fam.base, experts, home, work) for m in args.methods]
    doc = {"size": args.size, "params": fam.params, "experts": args.experts,
           "register_s": reg, "results": results, "total_s": time.perf_counter() - t0}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"merge_{args.size.replace('.', '_')}_K{args.experts}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = (f"# MergePipe vs mergekit, {args.size} ({fam.params / 1e6:.0f}M params), "
          f"K={args.experts}, float32 output, cold page cache\n\n{table(results)}\n\n"
          f"One-time registration (s, cold): {json.dumps(reg)}\n")
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

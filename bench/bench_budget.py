"""Budget mode across K experts and I/O budgets, against mergekit's full merge in the same run.

For each K: one mergekit task-arithmetic merge (reads everything), then MergePipe
at each budget, page cache dropped for all model files before every run. The
deviation of each budget is measured against mergekit's float32 full merge
(the exact merge; MergePipe's 100% run reproduces it to float32 rounding). Reported per run:
expert bytes read (MergePipe's reader count; for mergekit the expert files'
size, which it reads whole), physical bytes read, wall time, peak RSS,
deviation from the exact merge and the plan's error bound. Block statistics
(``analyze``) and registration are one-time catalog costs, reported apart.

    python bench/bench_budget.py --size 0.6b --ks 2 4 8 16 --budgets 5 10 25 50 100
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import register_all  # noqa: E402
from family import make_family  # noqa: E402
from harness import (MERGEKIT_ENV, THREAD_ENV, compare_models, dir_bytes, drop_cache,  # noqa: E402
                     gib, merge_config, mergekit_cmd, mergepipe_cmd, run_measured)


# The reference is mergekit's float32 full merge, which differs from MergePipe's
# exact merge by float32 summation order only; allow that much on top of the bound.
FLOAT_SLACK = 1e-6


def one_k(k: int, budgets: list[int], base: Path, experts: list[Path], home: Path,
          work: Path, on_run=None) -> dict:
    cfg = work / f"budget-ta-K{k}.yml"
    cfg.write_text(merge_config("task_arithmetic", base, experts, weight=round(1.0 / k, 6)))
    drop_cache(base, *experts)
    names = [e.name for e in experts]
    an = run_measured(mergepipe_cmd(home, "analyze", *experts, "--base", base, "--json"))
    analyze_info = {**json.loads(an["stdout"].strip().splitlines()[-1]), "wall_s": an["wall_s"]}
    mk_out = work / f"mk-ta-K{k}"
    shutil.rmtree(mk_out, ignore_errors=True)
    drop_cache(base, *experts)
    mk = run_measured(mergekit_cmd(cfg, mk_out), env=MERGEKIT_ENV)
    expert_bytes = dir_bytes(*experts)
    mergekit = {"wall_s": mk["wall_s"], "peak_rss": mk["peak_rss"], "read_bytes": mk["read_bytes"],
                "loadavg_1m": mk["loadavg_1m"],
                "expert_bytes": expert_bytes, "bytes_written": dir_bytes(mk_out)}
    result = {"k": k, "experts": names, "analyze": analyze_info, "mergekit": mergekit, "runs": []}
    exact_delta = compare_models(mk_out, base)["fro_diff"]
    for pct in sorted(budgets):  # cheap first: a cut-short run still has the small budgets
        out = work / f"mp-ta-K{k}-b{pct}"
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(base, *experts)
        res = run_measured(mergepipe_cmd(home, "apply", cfg, "--io-budget", f"{pct}%",
                                         "--out", out, "--json"))
        info = json.loads(res["stdout"].strip().splitlines()[-1])
        dev = compare_models(out, mk_out)
        shutil.rmtree(out, ignore_errors=True)
        row = {"budget_pct": pct, "io_budget": info["io_budget"],
               "expert_bytes": info["bytes_read"]["experts"], "base_bytes": info["bytes_read"]["base"],
               "read_bytes": res["read_bytes"], "wall_s": res["wall_s"],
               "engine_wall_s": info["wall_s"], "peak_rss": res["peak_rss"],
               "loadavg_1m": res["loadavg_1m"],
               "error_bound": info["error_bound"], "error_bound_kind": info["error_bound_kind"],
               "speedup_vs_mergekit": mergekit["wall_s"] / res["wall_s"],
               "dev_fro": dev["fro_diff"], "rel_dev": dev["rel_dev"], "max_abs": dev["max_abs"],
               "delta_share": dev["fro_diff"] / exact_delta if exact_delta else 0.0,
               "within_bound": dev["fro_diff"] <= info["error_bound"] + FLOAT_SLACK * dev["fro_ref"]}
        result["runs"].append(row)
        if on_run:
            on_run(result)
        print(f"K={k} {pct:>3}%: experts {gib(row['expert_bytes'])} GiB, {row['wall_s']:.1f} s "
              f"(mergekit {mergekit['wall_s']:.1f} s), rel dev {row['rel_dev']:.2e}, "
              f"bound {row['error_bound']:.3g}", flush=True)
    shutil.rmtree(mk_out, ignore_errors=True)
    return result


def markdown(doc: dict) -> str:
    lines = [f"# Budget grid: task arithmetic, {doc['size']} ({doc['params'] / 1e6:.0f}M params "
             f"per model), float32 output, cold page cache before every run\n",
             "| K | budget | expert GiB read | of full | wall s | mergekit s | speed-up | "
             "peak RSS GiB | mergekit RSS GiB | rel. deviation | ‖Δ‖ | bound | within |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["grid"]:
        mk = r["mergekit"]
        for x in sorted(r["runs"], key=lambda x: x["budget_pct"]):
            share = x["expert_bytes"] / mk["expert_bytes"] if mk["expert_bytes"] else 0
            within = "yes" if x.get("within_bound") else "NO"
            lines.append(
                f"| {r['k']} | {x['budget_pct']}% | {gib(x['expert_bytes'])} | {100 * share:.1f}% | "
                f"{x['wall_s']:.1f} | {mk['wall_s']:.1f} | {x['speedup_vs_mergekit']:.2f}× | "
                f"{gib(x['peak_rss'])} | {gib(mk['peak_rss'])} | {x['rel_dev']:.2e} | "
                f"{x['dev_fro']:.3g} | {x['error_bound']:.3g} | {within} |")
    lines.append("\nOne-time costs (cold cache): registration "
                 f"{json.dumps(doc['register_s'])} s; analyze per K: " +
                 ", ".join(f"K={r['k']}: {r['analyze']['wall_s']:.1f} s "
                           f"({gib(r['analyze']['bytes_read'])} GiB read, "
                           f"{len(r['analyze']['analyzed'])} new)" for r in doc["grid"]))
    loads = [x["loadavg_1m"] for r in doc["grid"] for x in r["runs"]] + \
        [r["mergekit"]["loadavg_1m"] for r in doc["grid"]]
    lines.append(f"\nLoad average (1 min) at the start of each run: {min(loads):.2f}–{max(loads):.2f} "
                 f"on 2 cores; both tools ran with OMP_NUM_THREADS={THREAD_ENV.get('OMP_NUM_THREADS', 'unset')}. "
                 "Wall time is the whole command (process start, planning, merge, fsync, commit). "
                 f"Command: `python bench/bench_budget.py --size {doc['size']} --ks "
                 f"{' '.join(str(r['k']) for r in doc['grid'])} --budgets "
                 f"{' '.join(map(str, doc['budgets']))}`")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ks = [r["k"] for r in doc["grid"]]
    budgets = sorted({x["budget_pct"] for r in doc["grid"] for x in r["runs"]})
    for b in budgets:
        pts = [(r["k"], x) for r in doc["grid"] for x in r["runs"] if x["budget_pct"] == b]
        ax1.plot([k for k, _ in pts], [x["wall_s"] for _, x in pts], marker="o", label=f"MergePipe {b}%")
        ax2.plot([k for k, _ in pts], [x["expert_bytes"] / 2**30 for _, x in pts], marker="o",
                 label=f"MergePipe {b}%")
    ax1.plot(ks, [r["mergekit"]["wall_s"] for r in doc["grid"]], "k--", marker="s", label="mergekit")
    ax2.plot(ks, [r["mergekit"]["expert_bytes"] / 2**30 for r in doc["grid"]], "k--", marker="s",
             label="mergekit")
    ax1.set(xlabel="experts K", ylabel="wall time (s)", title="End-to-end wall time")
    ax2.set(xlabel="experts K", ylabel="expert bytes read (GiB)", title="Expert I/O")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"Task arithmetic, {doc['size']} family, cold cache")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.6b")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--budgets", type=int, nargs="+", default=[5, 10, 25, 50, 100])
    ap.add_argument("--work", default="bench/out")
    ap.add_argument("--results", default="bench/results")
    ap.add_argument("--append", action="store_true",
                    help="Keep other K's results from an earlier run of the same size.")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    fam = make_family(work / "family", args.size, max(args.ks))
    home = work / f"ws-{args.size}"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"budget_{args.size.replace('.', '_')}"   # no dot: with_suffix would eat it
    t0 = time.perf_counter()
    doc = {"size": args.size, "params": fam.params, "budgets": args.budgets,
           "register_s": register_all(home, [fam.base, *fam.experts[:max(args.ks)]]), "grid": []}
    if args.append and stem.with_suffix(".json").exists():  # grow a grid run in parts
        old = json.loads(stem.with_suffix(".json").read_text())
        doc["grid"] = [r for r in old["grid"] if r["k"] not in args.ks]
        doc["register_s"] = {**old["register_s"], **doc["register_s"]}
    def save(partial: dict) -> None:
        doc["grid"] = sorted([r for r in doc["grid"] if r["k"] != partial["k"]] + [partial],
                             key=lambda r: r["k"])
        doc["total_s"] = time.perf_counter() - t0
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(doc))
        plot(doc, stem.with_suffix(".png"))

    for k in args.ks:
        save(one_k(k, args.budgets, fam.base, fam.experts[:k], home, work, on_run=save))
    print(markdown(doc))


if __name__ == "__main__":
    main()

"""Bench the search layer: every algorithm × seeds at one evaluation budget on a tiny world.

For each (algorithm, seed) a full search runs through the same coordinator the
CLI uses (real merges, real evaluations, N worker processes) and the bench
reports hypervolume median and IQR, wall time and worker utilisation
(busy / (workers × wall)). A second block reruns AP-BMM and synchronous qLogNEHVI
with each evaluation's generation time stretched by a heavy-tailed Pareto(α)
factor — an emulation of the evaluation-time variance of large models, where a
sync batch waits for its slowest member.

    python bench/search_bench.py                       # the full bench (slow on a laptop)
    python bench/search_bench.py --seeds 2 --n-total 16 --limit 40   # a reduced one
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from harness import machine

from mergepipe.catalog.store import open_catalog
from mergepipe.search import trials
from mergepipe.search.algorithms import ALGORITHMS
from mergepipe.search.config import SearchConfig
from mergepipe.search.coordinator import SearchRun, make_pool
from mergepipe.search.harvest import write_plots
from mergepipe.search.plots import hypervolume_plot, series_from_trials
from mergepipe.search.report import finished_points, summarise
from mergepipe.search.workers import WorkerPool


def quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) == 1:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def run_one(cat, home: Path, world: Path, algorithm: str, seed: int, args: argparse.Namespace,
            stretch: float | None = None) -> dict:
    cfg = SearchConfig(base=str(world / "base"), reasoning=str(world / "reasoning"),
                       tasks=[str(world / "test.jsonl")], algorithm=algorithm,
                       n_init=args.n_init, n_total=args.n_total, workers=args.workers, seed=seed,
                       limit=args.limit, group_size=args.group_size, stretch_alpha=stretch,
                       probe=str(world / "train.jsonl"), pool=args.pool)
    sid = trials.create_search(cat, algorithm, cfg.to_json())
    t0 = time.time()
    summary = SearchRun(cat, sid, home, progress=args.progress,
                        pool_factory=without_helpers(args.pool) if args.no_helpers else None
                        ).run()
    summary["bench_wall_s"] = time.time() - t0
    summary["seed"], summary["stretch_alpha"] = seed, stretch
    print(json.dumps({k: summary[k] for k in ("algorithm", "seed", "stretch_alpha", "trials",
                                              "hypervolume", "hypervolume_with_sources",
                                              "beaten_by_sources", "wall_s", "utilisation",
                                              "drain_idle")}),
          file=sys.stderr, flush=True)
    return summary


def without_helpers(kind: str) -> Callable[[int, str], WorkerPool]:
    """A pool whose workers never help each other: each evaluation runs whole on its
    owner (what the pools did before sharing), to measure what helping buys."""
    def make(size: int, prefix: str) -> WorkerPool:
        pool = make_pool(kind, size, prefix)
        pool.board = None
        return pool
    return make


def table(rows: list[dict], label: str) -> list[str]:
    out = [f"### {label}", "",
           "| algorithm | runs | HV median | HV IQR | HV with sources, median | IQR "
           "| wall s (median) | utilisation (median) "
           "| while work was left | idle after the last handout | helping (share of busy) "
           "| no better than a source |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_alg: dict[str, list[dict]] = {}
    for r in rows:
        by_alg.setdefault(r["algorithm"], []).append(r)
    for alg, rs in by_alg.items():
        q1, med, q3 = quartiles([r["hypervolume"] for r in rs])
        s1, smed, s3 = quartiles([r["hypervolume_with_sources"] for r in rs])
        out.append(f"| {alg} | {len(rs)} | {med:.4f} | {q1:.4f}–{q3:.4f} | "
                   f"{smed:.4f} | {s1:.4f}–{s3:.4f} | "
                   f"{statistics.median(r['wall_s'] for r in rs):.1f} | "
                   f"{statistics.median(r['utilisation'] for r in rs):.0%} | "
                   f"{statistics.median(r['utilisation_while_work_left'] for r in rs):.0%} | "
                   f"{statistics.median(r['drain_idle'] for r in rs):.0%} | "
                   f"{statistics.median(r['helper_s'] / r['busy_s'] for r in rs):.0%} | "
                   f"{beaten(rs)} |")
    return out + [""]


def beaten(rs: list[dict]) -> str:
    """Trials a source matched or beat, summed over runs, as a share of the trials."""
    n = sum(r.get("beaten_by_sources", 0) for r in rs)
    return f"{n}/{sum(r['trials'] for r in rs)}"


def per_seed(rows: list[dict], key: str = "hypervolume",
             label: str = "Per-seed hypervolume (natural times):") -> list[str]:
    """``key`` of every (algorithm, seed) run, and the mean, natural times."""
    seeds = sorted({r["seed"] for r in rows})
    out = [label, "",
           "| algorithm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
           "|---|" + "---:|" * (len(seeds) + 1)]
    by_alg: dict[str, dict[int, float]] = {}
    for r in rows:
        by_alg.setdefault(r["algorithm"], {})[r["seed"]] = r[key]
    for alg, hv in by_alg.items():
        cells = [f"{hv[s]:.4f}" if s in hv else "–" for s in seeds]
        out.append(f"| {alg} | " + " | ".join(cells) + f" | {statistics.mean(hv.values()):.4f} |")
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="default", help="tiny world size (test | default)")
    ap.add_argument("--world-dir", help="an already built world directory (overrides --world)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n-init", type=int, default=8)
    ap.add_argument("--n-total", type=int, default=40)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="test problems per evaluation")
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--stretch-alpha", type=float, default=1.5,
                    help="Pareto α of the emulated evaluation-time stretch (0: skip that block)")
    ap.add_argument("--stretch-seeds", type=int, default=1)
    ap.add_argument("--home", default="bench/out/search-ws")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--pool", choices=("local", "ray"), default="local",
                    help="evaluators as local processes or as Ray actors (a local Ray instance)")
    ap.add_argument("--no-helpers", action="store_true",
                    help="a free worker never helps a slow trial (to measure what helping buys)")
    args = ap.parse_args()

    torch.set_num_threads(1)
    if args.world_dir:
        world = Path(args.world_dir).resolve()
    else:
        from mergepipe.world.build import ensure_world
        world = ensure_world(args.world)
    home, out = Path(args.home).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results, stretched = [], []
    with open_catalog(home) as cat:
        for alg in args.algorithms.split(","):
            for seed in range(args.seeds):
                results.append(run_one(cat, home, world, alg, seed, args))
        if args.stretch_alpha:
            for alg in ("apbmm", "sync-qnehvi"):
                for seed in range(args.stretch_seeds):
                    stretched.append(run_one(cat, home, world, alg, seed, args,
                                             stretch=args.stretch_alpha))
        best = max((r for r in results if r["algorithm"] == "apbmm"),
                   key=lambda r: r["hypervolume"], default=None)
        if best:
            write_plots(cat, best["search_id"], str(out / "search_pareto.png"),
                        str(out / "search_hv.png"))
        if stretched:
            series = {f"{r['algorithm']} (seed {r['seed']})": series_from_trials(
                finished_points(trials.list_trials(cat, r["search_id"]))) for r in stretched}
            hypervolume_plot(series, out / "search_hv_stretched.png",
                             f"heavy-tailed evaluation times (Pareto α={args.stretch_alpha}), "
                             f"emulated")
        final = [summarise(cat, r["search_id"]) for r in results + stretched]
    lines = [f"world={world.name} workers={args.workers} budget={args.n_init}+"
             f"{args.n_total - args.n_init} seeds={args.seeds} limit={args.limit} "
             f"group_size={args.group_size} pool={args.pool}"
             f"{' (no helpers)' if args.no_helpers else ''}", ""]
    lines += table(results, "natural evaluation times")
    if stretched:
        lines += table(stretched, f"evaluation times × Pareto(α={args.stretch_alpha}) factor "
                                  f"(emulation of large-model evaluation variance)")
    lines += per_seed(results)
    lines += per_seed(results, "hypervolume_with_sources",
                      "Per-seed hypervolume of the front with the two sources (natural times):")
    walls = {a: statistics.median(r["wall_s"] for r in stretched if r["algorithm"] == a)
             for a in ("apbmm", "sync-qnehvi") if any(r["algorithm"] == a for r in stretched)}
    if len(walls) == 2:
        lines += [f"Stretched times: AP-BMM's median wall time is {walls['apbmm']:.1f} s against "
                  f"synchronous qLogNEHVI's {walls['sync-qnehvi']:.1f} s "
                  f"({walls['sync-qnehvi'] / walls['apbmm']:.2f}× faster) at the same "
                  f"{args.n_total} evaluations."]
    lines += ["", "Evaluations use the whole test split unless --limit is given; 'HV' is over "
              "the trials' own points (the two sources are not counted), so a trial that "
              "re-measures a source earns the area the source would add; 'HV with sources' "
              "is over the front a user gets from `search pareto`, the trials and the two "
              "sources, which cost no trial; 'no better than a source' counts the trials a "
              "source matches or beats on both objectives (evaluations spent for nothing, "
              "the shared initial design included). Reference point "
              "(−0.2, −0.2); the grids do not depend on the seed. Utilisation is busy / "
              "(workers × wall); 'while work was left' is the same up to the moment the last "
              "trial was handed out, and 'idle after the last handout' is the share of worker "
              "time spent with nothing to run while the slowest trials finish (the budget's "
              "drain). A worker with no new trial to run helps an in-flight one: it loads the "
              "same candidate and scores generation batches its owner has not reached "
              "(mergepipe/search/sharing.py); 'helping' is the share of busy time spent so, "
              "loads included. The stretch multiplies generation time only (what varies "
              "between candidates), for owners and helpers alike. Evaluation workers are "
              "processes "
              f"on the same cores as the coordinator. Machine: {machine()}.", "",
              "Command: `python " + " ".join(sys.argv) + "`"]
    text = "\n".join(lines)
    print(text)
    (out / "search_bench.md").write_text(text + "\n")
    (out / "search_bench.json").write_text(json.dumps(final, default=str, indent=1))


if __name__ == "__main__":
    main()

"""How long a person waits for the command line: `--help`, and catalog questions
(`sql`, `models`, `lineage`, `runs_view`, `search status`) on a catalog of N runs.

The catalog gets a few real merges of a tiny family through the library, then
their run, model and lineage rows are repeated under new ids up to N runs, so
queries see a catalog of that size. Each command runs as a user's shell runs
it (a fresh `python -m mergepipe`), warm disk, best and median of R runs.

    python bench/cli_latency.py --runs 1000 --repeat 5 --md-out bench/results/cli_latency.md

Run it against another checkout (e.g. an older commit) with ``--code DIR``:
the catalog is built by that code, so its schema matches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD = r"""
import sys, uuid
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import make_llama
from mergepipe import api
root, n_runs = Path({root!r}), {runs}
base = make_llama(root / "base", seed=0)
experts = [make_llama(root / f"e{{i}}", seed=i + 1, base=base) for i in range(3)]
with api.open_catalog(root / "ws") as cat:
    real = 0
    for i, w in enumerate((0.2, 0.4, 0.6, 0.8)):
        spec = {{"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                 "models": [{{"model": str(e), "parameters": {{"weight": w}}}} for e in experts]}}
        api.apply_plan(cat, api.build_plan(cat, spec), root / f"m{{i}}")
        real += 1
    c = cat.conn.connection.dbapi_connection  # repeat the rows of the real runs
    runs = c.execute("SELECT * FROM runs").fetchall()
    cols = [d[0] for d in c.description]
    for k in range(n_runs - real):
        row = dict(zip(cols, runs[k % len(runs)]))
        mid = uuid.uuid4().hex
        c.execute("INSERT INTO models SELECT * REPLACE (? AS model_id, ? AS name, ? AS path) "
                  "FROM models WHERE model_id = ?",
                  [mid, f"copy{{k:05d}}", f"/nowhere/copy{{k:05d}}", row["model_id"]])
        c.execute("INSERT INTO lineage SELECT * REPLACE (? AS child_model_id) FROM lineage "
                  "WHERE child_model_id = ?", [mid, row["model_id"]])
        row.update(run_id=uuid.uuid4().hex, model_id=mid)
        c.execute(f"INSERT INTO runs ({{', '.join(cols)}}) VALUES ({{', '.join('?' * len(cols))}})",
                  list(row.values()))

    # a finished search of 50 trials (rows only), summarised as its coordinator leaves it
    from mergepipe.search import {trials_module} as rows
    sid = rows.create_search(cat, "sobol", {{"workers": 2, "n_total": 50}})
    for i in range(50):
        rows.submit_trial(cat, sid, i, [i / 50], f"plan{{i}}", "s1.w0")
        rows.finish_trial(cat, sid, i, ok=True, objectives=(i / 50, 1 - (i / 50) ** 2),
                          started=1e9 + i, finished=1e9 + i + 0.5, accuracy=0.5,
                          mean_tokens=10.0)
    rows.update_search(cat, sid, status="FINISHED")
    if hasattr(rows, "store_summary"):
        from mergepipe.search.report import summarise
        rows.store_summary(cat, sid, summarise(cat, sid))
    print(cat.conn.connection.dbapi_connection.execute("SELECT count(*) FROM runs").fetchone()[0])
"""

COMMANDS = [
    ["--help"], ["apply", "--help"], ["search", "run", "--help"],
    ["sql", "SELECT count(*) AS n FROM runs"], ["models"], ["lineage", "copy00007"],
    ["sql", "SELECT status, count(*) AS n, sum(bytes_written) AS bytes FROM runs_view GROUP BY 1"],
    ["search", "status"],
]


def timed(cmd: list[str], env: dict[str, str], repeat: int, cwd: str) -> tuple[float, float]:
    walls = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "mergepipe", *cmd], env=env, cwd=cwd,
                             capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise SystemExit(f"{cmd}: {res.stderr.strip()}")
    return min(walls), statistics.median(walls)


def _version_of(code: str) -> str:
    """The commit of the measured checkout, when it is a git checkout."""
    res = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return res.stdout.strip() or code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]),
                    help="checkout whose mergepipe to measure (default: this one)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    with tempfile.TemporaryDirectory(prefix="cli-latency-") as tmp:
        env = {**os.environ, "PYTHONPATH": args.code, "MERGEPIPE_HOME": str(Path(tmp) / "ws"),
               "HF_HUB_OFFLINE": "1"}
        old = not (Path(args.code) / "mergepipe" / "search" / "trials.py").exists()
        build = BUILD.format(tests=tests, root=tmp, runs=args.runs,
                             trials_module="store" if old else "trials")
        out = subprocess.run([sys.executable, "-c", build],
                             env=env, cwd=tmp, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr)
        n = int(out.stdout.strip().splitlines()[-1])
        rows = []
        for cmd in COMMANDS:
            try:
                best, med = timed(cmd, env, args.repeat, tmp)  # cwd: not a checkout
            except SystemExit as exc:  # a command the measured code does not have
                rows.append({"command": " ".join(cmd), "error": str(exc)[:120]})
                continue
            rows.append({"command": " ".join(cmd), "best_s": round(best, 3),
                         "median_s": round(med, 3)})
    load = os.getloadavg()
    doc = {"label": args.label, "code": args.code, "mergepipe": _version_of(args.code), "runs": n, "repeat": args.repeat,
           "loadavg": [round(x, 2) for x in load], "rows": rows}
    print(json.dumps(doc, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

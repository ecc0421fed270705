"""How fast the disk delivers a merge's reads with 1, 2, 4 and 8 reads in flight.

The engine reads each input's rows of a block in turn, so its reads hop
between the models' files in half-MiB pieces. This replays that pattern (a
half-MiB range of each model's shard in turn, shard by shard) from a cold page
cache with N threads issuing the ``pread``s, and prints MiB/s for each N: the
evidence behind the engine's ``read_threads`` (more reads in flight where the
cores allow).

    python bench/read_threads.py --size 0.6b --experts 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from family import make_family  # noqa: E402
from harness import drop_cache, machine  # noqa: E402

PIECE = 1 << 19


def replay(dirs: list[Path], threads: int) -> dict[str, float]:
    """Cold-cache interleaved reads of every shard of ``dirs``; bytes and seconds."""
    shards = [sorted(d.glob("*.safetensors")) for d in dirs]
    drop_cache(*dirs)
    fds = [[os.open(f, os.O_RDONLY) for f in fl] for fl in shards]
    jobs = [(fds[m][s], off) for s in range(len(shards[0]))
            for off in range(0, os.path.getsize(shards[0][s]), PIECE) for m in range(len(dirs))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(lambda j: len(os.pread(j[0], PIECE, j[1])), jobs))
    wall = time.perf_counter() - t0
    for fl in fds:
        for fd in fl:
            os.close(fd)
    return {"threads": threads, "bytes": n, "wall_s": wall, "mib_s": n / 2**20 / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.6b")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--root", default="bench/out/family")
    ap.add_argument("--json-out", help="also write the rows as JSON here")
    args = ap.parse_args()
    fam = make_family(args.root, args.size, args.experts)
    rows = [replay([fam.base, *fam.experts], t) for t in args.threads]
    print(f"{machine()}; {args.size}, base + {args.experts} experts, {PIECE >> 10} KiB reads, "
          f"cold cache")
    print("| reads in flight | GiB | s | MiB/s |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']} | {r['bytes'] / 2**30:.2f} | {r['wall_s']:.1f} | {r['mib_s']:.0f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Shared measuring tools for the benchmarks: cold caches, per-process cost, output diffs.

Every tool under test runs as its own subprocess so that its wall time, peak
RSS (the child's VmHWM, polled every 0.1 s) and physical bytes read (the
child's ``/proc`` I/O counters, which Linux folds into the parent's when the
child is reaped) are measured the same way for MergePipe and for mergekit.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent


def drop_cache(*dirs: Path) -> None:
    """Evict the files under ``dirs`` from the page cache so the next read is physical."""
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _proc_io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k.strip()] = int(v)
    return out


# Both tools get the same thread settings: torch's default (one thread per core
# the process may use) unless BENCH_THREADS says otherwise. On a shared,
# oversubscribed machine one intra-op thread can be faster for both than
# OpenMP threads waiting for a core.
THREAD_ENV = ({"OMP_NUM_THREADS": os.environ["BENCH_THREADS"],
               "MKL_NUM_THREADS": os.environ["BENCH_THREADS"]}
              if os.environ.get("BENCH_THREADS") else {})


def _vm_hwm(pid: int) -> int:
    """The child's own peak RSS. rusage's ru_maxrss would not do: Linux carries the
    parent's RSS at fork through exec, so every child would report at least the bench's."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` and return its wall time, peak RSS, physical reads/writes and output."""
    # this checkout's mergepipe, whatever an editable install points at
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, **THREAD_ENV, "PYTHONPATH": path, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load = os.getloadavg()[0]
        before = _proc_io()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env)
        hwm, status = 0, None
        while status is None:
            hwm = max(hwm, _vm_hwm(proc.pid))
            pid, st, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = st
            else:
                time.sleep(0.1)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        after = _proc_io()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    res = {"cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": wall,
           "peak_rss": hwm,
           "read_bytes": after["read_bytes"] - before["read_bytes"],
           "rchar": after["rchar"] - before["rchar"],
           "write_bytes": after["write_bytes"] - before["write_bytes"],
           "loadavg_1m": load, "stdout": stdout}
    if proc.returncode != 0:
        raise RuntimeError(f"{res['cmd']} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return res


def merge_config(method: str, base: Path, experts: list[Path], dtype: str = "float32",
                 merge_wide: dict[str, Any] | None = None, **params: Any) -> str:
    """One YAML config that both mergekit and MergePipe accept (float32: exact comparison);
    ``params`` go to every model, ``merge_wide`` to the top-level parameters."""
    lines = [f"merge_method: {method}", f"base_model: {Path(base).resolve()}", f"dtype: {dtype}",
             "models:"]
    for e in experts:
        lines.append(f"  - model: {Path(e).resolve()}")
        lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    if merge_wide:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in merge_wide.items()) + "}")
    return "\n".join(lines) + "\n"


def mergepipe_cmd(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mergepipe", "--home", str(home), *map(str, args)]


def mergekit_cmd(config: Path, out: Path) -> list[str]:
    return ["mergekit-yaml", str(config), str(out), "--quiet"]


MERGEKIT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _tensor_files(d: Path) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        return {n: d / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(d.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, "pt") as h:
            out.update({n: f for n in h.keys()})
    return out


def compare_models(a: Path, b: Path, base: Path | None = None) -> dict[str, float]:
    """Frobenius distance and max-abs difference of two checkpoints, tensor by tensor.

    With ``base``, also the norm of ``a − base`` (the merged task vector), the
    natural scale for how much of a merge's change a deviation represents.
    """
    fa, fb = _tensor_files(Path(a)), _tensor_files(Path(b))
    fbase = _tensor_files(Path(base)) if base else {}
    diff_sq = norm_sq = delta_sq = 0.0
    max_abs = 0.0
    for name, path in fa.items():
        with safe_open(path, "pt") as ha, safe_open(fb[name], "pt") as hb:
            x = ha.get_tensor(name).double()
            y = hb.get_tensor(name).double()
        d = x - y
        diff_sq += float((d * d).sum())
        norm_sq += float((x * x).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
        if name in fbase:
            with safe_open(fbase[name], "pt") as hc:
                z = hc.get_tensor(name).double()
            delta_sq += float(((x - z) ** 2).sum())
    return {"fro_diff": math.sqrt(diff_sq), "fro_ref": math.sqrt(norm_sq),
            "rel_dev": math.sqrt(diff_sq / norm_sq) if norm_sq else 0.0,
            "delta_fro": math.sqrt(delta_sq), "max_abs": max_abs}


def io_floor(*dirs: Path) -> dict[str, Any]:
    """``cat`` of every safetensors file under ``dirs`` from a cold cache: the disk's floor."""
    files = sorted(str(p) for d in dirs for p in Path(d).rglob("*.safetensors"))
    drop_cache(*dirs)
    res = run_measured(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
    return {"wall_s": res["wall_s"], "read_bytes": res["read_bytes"],
            "bytes": sum(Path(f).stat().st_size for f in files), "loadavg_1m": res["loadavg_1m"]}


def dir_bytes(*dirs: Path) -> int:
    return sum(p.stat().st_size for d in dirs for p in Path(d).rglob("*.safetensors"))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def torch_threads() -> int:
    return torch.get_num_threads()


def machine() -> str:
    """CPU model, cores and load: training and timings differ between machines, so every
    results file says which one it came from."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, torch kernels {_capability()}, "
            f"load average {load} at the end")


def _capability() -> str:
    """The instruction set torch runs on: the tiny world trains to different weights under
    each, so results on the same world name differ between AVX2 and AVX-512 machines."""
    try:
        import torch
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # torch missing or too old to say
        return "unknown"

"""Peak memory of apply is bounded by the block size, not by tensor or model size."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROWS, COLS = 4096, 8192          # one tensor = 128 MiB in float32
BLOCK = 1 << 20


def _model(path: Path, seed: int, base: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        noise = torch.randn(ROWS, COLS, generator=g)
        sd[name] = noise if base is None else base[name] + 0.01 * noise
    path.mkdir(parents=True)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return sd


@pytest.mark.slow
def test_peak_rss_of_apply_is_bounded_by_blocks(tmp_path):
    base = _model(tmp_path / "base", 0, None)
    _model(tmp_path / "e1", 1, base)
    _model(tmp_path / "e2", 2, base)
    del base
    spec = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
            "models": [{"model": str(tmp_path / "e1"), "parameters": {"weight": 0.5}},
                       {"model": str(tmp_path / "e2"), "parameters": {"weight": 0.5}}],
            "out_shard_size": "100MB"}
    script = textwrap.dedent(f"""
        import json
        from mergepipe import api
        def status(key):  # VmHWM is per address space: not inherited from the parent
            for line in open('/proc/self/status'):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        with api.open_catalog({str(tmp_path / 'ws')!r}) as cat:
            plan = api.build_plan(cat, {spec!r})
            import torch; torch.zeros(1) + 1  # warm the allocator and kernels
            before = status('VmRSS')
            res = api.apply_plan(cat, plan, {str(tmp_path / 'out')!r}, block_bytes={BLOCK})
            peak = status('VmHWM')
        print(json.dumps({{"before": before, "peak": peak, "written": res.bytes_written}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    inputs = 3
    # per block: float32 copies of each input and the delta/output temporaries
    bound = 8 * BLOCK * (inputs + 2) + (48 << 20)
    tensor_bytes = ROWS * COLS * 4
    assert m["written"] > 2 * tensor_bytes
    assert bound < tensor_bytes, "the bound must be tighter than one whole tensor"
    print("peak growth MiB", (m["peak"] - m["before"]) / 2**20, "bound MiB", bound / 2**20)
    assert m["peak"] - m["before"] <= bound, m

"""Helpers for running one merge config through mergekit and MergePipe and comparing.

mergekit runs in-process through its API (``run_merge``), not its CLI, so a
test module pays its import once; outputs are cached per config under the
session's temporary directory, so modules that ask for the same merge share it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file


def state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def correlated_experts(root: Path, base: Path, n: int = 3, seed: int = 11) -> dict[str, Path]:
    """Experts sharing a common fine-tune direction (task vectors with cosine ≈ 0.5).

    Independent noise gives near-orthogonal task vectors, for which Model
    Stock collapses to the base; a shared direction exercises it properly.
    """
    done = root / ".done"
    names = [f"c{k + 1}" for k in range(n)]
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        ref = state(base)
        g = torch.Generator().manual_seed(seed)
        shared = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
        for name in names:
            out = root / name
            shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
            sd = {k: (v + 0.02 * shared[k] + 0.02 * torch.randn(v.shape, generator=g)).contiguous()
                  for k, v in ref.items()}
            save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
        done.write_text("ok")
    return {name: root / name for name in names}


def method_models(tiny_family: dict[str, Path], tmp_path_factory: Any) -> dict[str, Path]:
    """The conftest family (base, e1–e3) plus correlated experts c1–c3."""
    root = tmp_path_factory.getbasetemp() / "method-models"
    return {**tiny_family, **correlated_experts(root, tiny_family["base"])}


@pytest.fixture(scope="module")
def models(tiny_family: dict[str, Path], tmp_path_factory: Any) -> dict[str, Path]:
    """Import into a test module to use: the family plus correlated experts."""
    return method_models(tiny_family, tmp_path_factory)


@pytest.fixture(scope="module")
def home(tmp_path_factory: Any) -> Path:
    """One MergePipe workspace per test module: models are registered once."""
    return tmp_path_factory.mktemp("ws")


def fill(cfg: Any, models: dict[str, Path]) -> Any:
    """Replace ``@name`` model placeholders by absolute paths (mergekit needs them)."""
    if isinstance(cfg, str) and cfg.startswith("@"):
        return str(Path(models[cfg[1:]]).resolve())
    if isinstance(cfg, dict):
        return {k: fill(v, models) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [fill(v, models) for v in cfg]
    return cfg


def _key(cfg: dict[str, Any], seed: int | None, stable_sort: bool = False) -> str:
    key = [cfg, seed] + (["stable"] if stable_sort else [])
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def mergekit_merge(cfg: dict[str, Any], root: Path, seed: int | None = None,
                   stable_sort: bool = False) -> Path:
    """mergekit's output for ``cfg`` (absolute model paths), cached by config.

    ``stable_sort`` runs mergekit with ``torch.argsort``/``torch.sort`` made
    stable for the duration (restored after), which fixes its order among
    equal magnitudes to flat-index order — the tie rule MergePipe uses.
    """
    import contextlib
    import functools

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = Path(root) / "mergekit" / _key(cfg, seed, stable_sort)
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        opts = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False,
                            random_seed=seed)
        with contextlib.ExitStack() as undo:
            if stable_sort:
                for name in ("argsort", "sort"):
                    orig = getattr(torch, name)
                    setattr(torch, name, functools.partial(orig, stable=True))
                    undo.callback(setattr, torch, name, orig)
            run_merge(MergeConfiguration.model_validate(copy.deepcopy(cfg)), str(out), opts)
    return out


def mergepipe_merge(cfg: dict[str, Any], home: Path, out: Path, seed: int | None = None) -> Path:
    """Plan and apply ``cfg`` with MergePipe's library API into ``out``."""
    from mergepipe import api

    with api.open_catalog(home) as cat:
        plan = api.build_plan(cat, copy.deepcopy(cfg), seed=seed)
        name = f"{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}"
        api.apply_plan(cat, plan, out, name=name)
    return out


def mergepipe_execute(cfg: dict[str, Any], home: Path, out: Path, seed: int | None = None) -> Path:
    """Plan ``cfg`` and run only the engine into ``out``: a fresh execution every time.

    (``apply`` of an already-committed plan returns the earlier commit instead.)
    """
    from mergepipe import api

    with api.open_catalog(home) as cat:
        plan = api.build_plan(cat, copy.deepcopy(cfg), seed=seed, store=False)
    api.execute_plan(plan, out, threads=torch.get_num_threads())  # the caller's, not the idle
    return out


def max_abs_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    _, exp = torch.frexp(x.float())
    ulp = torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - 8)
    return torch.where(x == 0, torch.zeros_like(ulp), ulp)


def max_bf16_ulps(ours_bf16: dict[str, torch.Tensor], theirs_f32: dict[str, torch.Tensor]) -> float:
    """Worst |ours − theirs| over all tensors, in bf16 ulps at mergekit's float32 value."""
    assert set(ours_bf16) == set(theirs_f32)
    worst = 0.0
    for k, ref in theirs_f32.items():
        assert ours_bf16[k].dtype == torch.bfloat16, (k, ours_bf16[k].dtype)
        err = (ours_bf16[k].float() - ref.float()).abs()
        ulp = bf16_ulp(ref)
        ratio = torch.where(ulp > 0, err / ulp.clamp(min=1e-45), err * float("inf"))
        ratio = torch.nan_to_num(ratio, nan=0.0)
        worst = max(worst, ratio.max().item())
    return worst


def signed_gap(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
               base: dict[str, torch.Tensor],
               direction: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean of (ours − theirs)·sign(direction) over every element, and its standard error.

    Two draws of the same random merge have the same expectation, so the mean
    is 0 up to sampling noise; a systematic difference (a missing rescale, a
    wrong keep probability) shifts it by many standard errors.
    """
    xs = []
    for k in sorted(base):
        d_ours = ours[k].float() - base[k].float()
        d_theirs = theirs[k].float() - base[k].float()
        xs.append(((d_ours - d_theirs) * direction[k].float().sign()).reshape(-1))
    x = torch.cat(xs).double()
    return x.mean().item(), (x.std() / x.numel() ** 0.5).item()

"""Generate a model family for benchmarks: one Llama base and K fine-tune-like experts.

Real fine-tunes move every weight a little and a few places a lot, so each
expert here is ``base + background + hot``: small Gaussian noise on every
entry, plus large perturbations on contiguous row runs of a few "hot" layers
(chosen per expert) and a few embedding rows. Delta energy is therefore
concentrated in some blocks, which is the situation budget planning exploits.
Checkpoints are written with ``save_pretrained`` (safetensors, sharded like the
Hub's), and cached: expert k only depends on (size, seed, k), so a family of 16
contains the families of 2, 4 and 8.

    python bench/family.py --size 0.6b --experts 16 --out bench/out/family
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SIZES = {
    # name: (hidden, intermediate, layers, heads, vocab)
    "tiny": (128, 352, 4, 4, 4096),
    "small": (512, 1408, 12, 8, 16000),
    "medium": (1024, 2816, 16, 16, 32000),
    "0.6b": (1280, 3456, 26, 20, 32000),
}
BACKGROUND = 0.02       # std of every entry's delta, relative to the tensor's std
HOT = 0.5               # std of hot-row deltas, relative to the tensor's std
HOT_LAYER_SHARE = 0.25  # share of layers an expert changes a lot
HOT_ROW_SHARE = 0.15    # share of rows hot inside a hot tensor


@dataclass
class Family:
    base: Path
    experts: list[Path]
    params: int
    gen_s: float


def _config(size: str):
    from transformers import LlamaConfig
    hidden, inter, layers, heads, vocab = SIZES[size]
    return LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       tie_word_embeddings=False, torch_dtype="bfloat16")


def _done(path: Path) -> bool:
    return (path / ".complete").exists()


def _save(model, path: Path, shard: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=shard)
    (path / ".complete").write_text("ok\n")


def _hot_runs(rows: int, share: float, gen: torch.Generator) -> list[tuple[int, int]]:
    """A few contiguous row runs covering about ``share`` of the rows."""
    if rows < 8:
        return [(0, rows)] if torch.rand(1, generator=gen).item() < share else []
    n_runs = 3
    length = max(1, int(rows * share / n_runs))
    starts = torch.randint(0, rows - length + 1, (n_runs,), generator=gen).tolist()
    return [(s, s + length) for s in starts]


@torch.no_grad()
def _perturb(model, base_state: dict[str, torch.Tensor], k: int, seed: int, layers: int) -> None:
    """Overwrite ``model``'s weights with expert k = base + background + hot deltas."""
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    n_hot = max(1, round(layers * HOT_LAYER_SHARE))
    hot_layers = set(torch.randperm(layers, generator=gen)[:n_hot].tolist())
    for name, p in model.named_parameters():
        ref = base_state[name].float()
        scale = float(ref.std()) if ref.numel() > 1 else 1.0
        delta = torch.randn(ref.shape, generator=gen) * (BACKGROUND * scale)
        parts = name.split(".")
        layer = int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None
        if layer in hot_layers or "embed" in name or "lm_head" in name:
            share = HOT_ROW_SHARE if layer is not None else 0.02
            for a, b in _hot_runs(ref.shape[0], share, gen):
                delta[a:b] += torch.randn(delta[a:b].shape, generator=gen) * (HOT * scale)
        p.copy_((ref + delta).to(p.dtype))


def make_family(root: str | Path, size: str = "tiny", experts: int = 4, seed: int = 0,
                shard: str = "500MB") -> Family:
    """Create (or reuse) base and experts 0..K-1 under ``root/size-seed``."""
    from transformers import LlamaForCausalLM
    t0 = time.perf_counter()
    cfg = _config(size)
    top = Path(root) / f"{size}-s{seed}"
    base_dir = top / "base"
    torch.manual_seed(seed)
    if _done(base_dir):
        model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    else:
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        _save(model, base_dir, shard)
    params = sum(p.numel() for p in model.parameters())
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = []
    for k in range(experts):
        path = top / f"expert{k:02d}"
        if not _done(path):
            _perturb(model, base_state, k, seed, cfg.num_hidden_layers)
            _save(model, path, shard)
        paths.append(path)
    meta = {"size": size, "seed": seed, "params": params, "config": cfg.to_dict()}
    (top / "family.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Family(base_dir, paths, params, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/out/family")
    args = ap.parse_args()
    fam = make_family(args.out, args.size, args.experts, args.seed)
    print(json.dumps({"base": str(fam.base), "experts": [str(p) for p in fam.experts],
                      "params": fam.params, "gen_s": round(fam.gen_s, 1)}))


if __name__ == "__main__":
    main()

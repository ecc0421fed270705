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
import math
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
    "4b": (3072, 8192, 36, 24, 32000),      # 8.5 GB in bf16: written tensor by tensor
}
STREAMED = {"4b"}       # too big to build as a model object beside its base state in RAM
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


def _llama_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of a Llama checkpoint, in the order transformers names them."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        pre = f"model.layers.{n}."
        out += [(pre + "self_attn.q_proj.weight", (h, h)), (pre + "self_attn.k_proj.weight", (h, h)),
                (pre + "self_attn.v_proj.weight", (h, h)), (pre + "self_attn.o_proj.weight", (h, h)),
                (pre + "mlp.gate_proj.weight", (i, h)), (pre + "mlp.up_proj.weight", (i, h)),
                (pre + "mlp.down_proj.weight", (h, i)),
                (pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The base's tensor, regenerated from (seed, name) whenever an expert needs it."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, name)) * 31 + len(name))
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _write_streamed(path: Path, cfg, tensors, shard_bytes: int = 2 << 30) -> None:
    """Safetensors shards of about ``shard_bytes`` plus config and index, one shard in RAM."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        n += 1
        fname = f"model-{n:05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard, size = {}, 0

    for name, t in tensors:
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.architectures = ["LlamaForCausalLM"]   # as a model's save_pretrained records it
    cfg.save_pretrained(path)
    (path / ".complete").write_text("ok\n")


def make_streamed_family(root: str | Path, size: str, experts: int, seed: int = 0) -> Family:
    """A family too big for :func:`make_family`'s in-memory model: same recipe
    (base + background + hot rows per expert), generated and written tensor by tensor."""
    t0 = time.perf_counter()
    cfg = _config(size)
    top = Path(root) / f"{size}-s{seed}"
    shapes = _llama_shapes(cfg)
    base_dir = top / "base"
    if not _done(base_dir):
        _write_streamed(base_dir, cfg, ((n, _base_tensor(n, s, seed)) for n, s in shapes))
    paths = []
    for k in range(experts):
        path = top / f"expert{k:02d}"
        if not _done(path):
            gen = torch.Generator().manual_seed(seed * 1000 + k)
            n_hot = max(1, round(cfg.num_hidden_layers * HOT_LAYER_SHARE))
            hot = set(torch.randperm(cfg.num_hidden_layers, generator=gen)[:n_hot].tolist())

            def expert_tensors(gen=gen, hot=hot):
                for name, shape in shapes:
                    ref = _base_tensor(name, shape, seed).float()
                    scale = float(ref.std()) if ref.numel() > 1 and len(shape) > 1 else 0.02
                    delta = torch.randn(shape, generator=gen) * (BACKGROUND * scale)
                    parts = name.split(".")
                    layer = int(parts[2]) if parts[1] == "layers" else None
                    if layer in hot or "embed" in name or "lm_head" in name:
                        share = HOT_ROW_SHARE if layer is not None else 0.02
                        for a, b in _hot_runs(shape[0], share, gen):
                            delta[a:b] += torch.randn(delta[a:b].shape, generator=gen) * (HOT * scale)
                    yield name, (ref + delta).to(torch.bfloat16)
            _write_streamed(path, cfg, expert_tensors())
        paths.append(path)
    params = sum(math.prod(s) for _, s in shapes)
    meta = {"size": size, "seed": seed, "params": params, "config": cfg.to_dict()}
    (top / "family.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Family(base_dir, paths, params, time.perf_counter() - t0)


def make_family(root: str | Path, size: str = "tiny", experts: int = 4, seed: int = 0,
                shard: str = "500MB") -> Family:
    """Create (or reuse) base and experts 0..K-1 under ``root/size-seed``."""
    if size in STREAMED:
        return make_streamed_family(root, size, experts, seed)
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

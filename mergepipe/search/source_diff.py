"""Measure how far the reasoning model moved from the base, per layer.

Two signals feed the layer prior: the relative weight change
‖W_r − W_b‖ / ‖W_b‖ (free from the catalog's block statistics when `analyze`
has run, else read from the checkpoints), and the change in what each layer
computes: 1 − cos between the two models' last-token hidden states after the
layer, on probe prompts from the *training* split (the test split is what the
search is scored on, so it must not shape the search).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import sqlalchemy as sa
import torch
from safetensors import safe_open

from mergepipe.catalog import schema
from mergepipe.catalog.names import parse_tensor_name
from mergepipe.catalog.store import Catalog
from mergepipe.evaluate.hf import silence_transformers
from mergepipe.errors import MergePipeError

PerLayer = tuple[list[float], float]   # (one value per layer, the head's value)


def _mean_by_layer(ratios: dict[str, float], num_layers: int) -> PerLayer:
    per: dict[int | None, list[float]] = defaultdict(list)
    for name, r in ratios.items():
        layer = parse_tensor_name(name)[0]
        per[layer if layer is not None and layer < num_layers else None].append(r)
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    return [mean(per[l]) for l in range(num_layers)], mean(per[None])


def param_diff_from_stats(cat: Catalog, reasoning_id: str, base_id: str,
                          num_layers: int) -> PerLayer | None:
    """Per-layer relative weight change from `block_stats`, or None if not analysed."""
    b = schema.block_stats
    rows = cat.rows(sa.select(b.c.tensor, sa.func.sum(b.c.delta_l2 * b.c.delta_l2).label("d2"),
                              sa.func.sum(b.c.base_l2 * b.c.base_l2).label("b2"))
                    .where(b.c.expert_model_id == reasoning_id, b.c.base_model_id == base_id)
                    .group_by(b.c.tensor))
    if not rows:
        return None
    ratios = {r["tensor"]: math.sqrt(r["d2"]) / max(math.sqrt(r["b2"]), 1e-12) for r in rows}
    return _mean_by_layer(ratios, num_layers)


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def param_diff_from_checkpoints(base_dir: str | Path, reasoning_dir: str | Path,
                                num_layers: int) -> PerLayer:
    """The same ratios computed by reading both checkpoints, one tensor at a time."""
    fb, fr = _tensor_files(Path(base_dir)), _tensor_files(Path(reasoning_dir))
    ratios: dict[str, float] = {}
    for name in sorted(set(fb) & set(fr)):
        with safe_open(str(fb[name]), "pt") as hb, safe_open(str(fr[name]), "pt") as hr:
            wb = hb.get_tensor(name).double()
            wr = hr.get_tensor(name).double()
        if not wb.is_floating_point():
            continue
        ratios[name] = float((wr - wb).norm() / wb.norm().clamp_min(1e-12))
    return _mean_by_layer(ratios, num_layers)


def probe_prompts(path: str | Path, n: int, exclude: Sequence[str | Path] = ()) -> list[str]:
    """The first ``n`` prompts of a JSONL file, refusing any file the search is scored on."""
    p = Path(path).resolve()
    if any(p == Path(e).resolve() for e in exclude):
        raise MergePipeError(f"probe prompts must come from the training split, not {p} "
                             f"(it is one of the search's evaluation tasks)")
    prompts = []
    with open(p) as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
            if len(prompts) >= n:
                break
    if not prompts:
        raise MergePipeError(f"no probe prompts in {p}")
    return prompts


def prompt_digest(prompts: Sequence[str]) -> list[str]:
    """Short hashes of the probe prompts, stored with the prior to show where it came from."""
    return [hashlib.blake2b(p.encode(), digest_size=8).hexdigest() for p in prompts]


@torch.no_grad()
def _last_token_states(model_dir: Path, prompts: Sequence[str]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    silence_transformers()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    per_prompt = []
    for text in prompts:
        ids = tok(text, return_tensors="pt")
        out = model(**ids, output_hidden_states=True)
        # hidden_states[0] is the embedding output; [l + 1] follows layer l.
        states = [h[0, -1] for h in out.hidden_states[1:]] + [out.logits[0, -1]]
        per_prompt.append(torch.stack([s.double() for s in states[:-1]]))
        per_prompt.append(states[-1].double())
    return per_prompt


def activation_diff(base_dir: str | Path, reasoning_dir: str | Path,
                    prompts: Sequence[str], num_layers: int) -> PerLayer:
    """Mean 1 − cos of last-token states after each layer; the head uses the logits."""
    sb = _last_token_states(Path(base_dir), prompts)
    sr = _last_token_states(Path(reasoning_dir), prompts)
    layer_sum = torch.zeros(num_layers, dtype=torch.double)
    head_sum = 0.0
    for i in range(0, len(sb), 2):
        hb, hr = sb[i][:num_layers], sr[i][:num_layers]
        layer_sum += 1 - torch.nn.functional.cosine_similarity(hb, hr, dim=-1)
        head_sum += float(1 - torch.nn.functional.cosine_similarity(sb[i + 1], sr[i + 1], dim=0))
    n = len(sb) // 2
    return (layer_sum / n).tolist(), head_sum / n


def describe_probe(path: str | Path, prompts: Sequence[str]) -> dict[str, Any]:
    return {"path": str(Path(path).resolve()), "n": len(prompts), "digests": prompt_digest(prompts)}

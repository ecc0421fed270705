"""Parse a tensor name into (layer index, module) with anchored patterns.

Anchoring matters: ``model.layers.12.mlp`` is layer 12, never layer 1 (the
AP-BMM release matched ``layers\\.1`` unanchored and mixed them up).
"""
from __future__ import annotations

import re

# A layer container followed by its index and a dot, at the start or after a dot.
LAYER_PATTERN = re.compile(
    r"(?:^|\.)(?:layers|h|blocks|block|layer|decoder_layers)\.(?P<idx>\d+)\.(?P<module>.+)$")
_MODULE_ALIASES = {
    "embed_tokens.weight": "embed_tokens",
    "wte.weight": "embed_tokens",
    "wpe.weight": "embed_positions",
    "lm_head.weight": "lm_head",
    "norm.weight": "final_norm",
    "ln_f.weight": "final_norm",
    "ln_f.bias": "final_norm",
    "norm.bias": "final_norm",
}


def parse_tensor_name(name: str) -> tuple[int | None, str]:
    """Return (layer index or None, module) for a checkpoint tensor name."""
    m = LAYER_PATTERN.search(name)
    if m:
        module = m.group("module")
        for suffix in (".weight", ".bias"):
            if module.endswith(suffix):
                module = module[: -len(suffix)]
        return int(m.group("idx")), module
    tail = name.split(".")
    for n in (2, 1):
        key = ".".join(tail[-n:])
        if key in _MODULE_ALIASES:
            return None, _MODULE_ALIASES[key]
    return None, name.rsplit(".", 1)[0] if "." in name else name


def layer_of(name: str) -> int | None:
    return parse_tensor_name(name)[0]

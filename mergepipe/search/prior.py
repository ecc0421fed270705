"""Layer importance prior: which coordinates should the GP treat as sensitive first.

Layers where the reasoning model moved far from the base (in weights and in
what they compute on training prompts) are likely to change accuracy and
length the most, so they start with short ARD lengthscales; the data can
override this at every refit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

# (upper rank fraction, lengthscale): the top 15% most important coordinates get 0.5, …
LENGTHSCALE_TIERS: tuple[tuple[float, float], ...] = ((0.15, 0.5), (0.40, 1.0), (0.70, 2.0),
                                                       (1.01, 5.0))
CLIP = (0.05, 1.0)


def robust_normalise(values: Sequence[float]) -> list[float]:
    """sigmoid((v − median) / (1.4826·MAD)): outlier-proof squashing into (0, 1)."""
    v = torch.tensor([float(x) for x in values], dtype=torch.double)
    med = v.median()
    scale = 1.4826 * (v - med).abs().median()
    if float(scale) <= 1e-12:  # half the values tie: fall back to the spread that exists
        scale = v.std() if v.numel() > 1 and float(v.std()) > 1e-12 else torch.tensor(1.0)
    return torch.sigmoid((v - med) / scale).tolist()


def smooth(values: Sequence[float]) -> list[float]:
    """[¼, ½, ¼] over neighbouring layers, edges replicated (adjacent layers act alike)."""
    v = [float(x) for x in values]
    if len(v) < 2:
        return v
    padded = [v[0]] + v + [v[-1]]
    return [0.25 * padded[i] + 0.5 * padded[i + 1] + 0.25 * padded[i + 2] for i in range(len(v))]


def lengthscales_from_importance(importance: Sequence[float]) -> list[float]:
    """Initial ARD lengthscales by importance rank (most important → shortest)."""
    d = len(importance)
    order = sorted(range(d), key=lambda i: -float(importance[i]))
    out = [0.0] * d
    for rank, i in enumerate(order):
        frac = rank / d
        out[i] = next(ls for upper, ls in LENGTHSCALE_TIERS if frac < upper)
    return out


@dataclass
class LayerPrior:
    """Per-layer measurements, the combined importance and the lengthscales they imply.

    ``param_diff``/``act_diff`` have one entry per transformer layer; the head
    (embeddings, final norm, lm_head) is kept apart because it has no neighbours
    to be smoothed with.
    """

    param_diff: list[float]
    act_diff: list[float]
    head_param_diff: float
    head_act_diff: float
    importance_layers: list[float] = field(default_factory=list)
    importance_head: float = 0.0
    param_source: str = ""
    probe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.param_diff) != len(self.act_diff):
            raise ValueError("parameter and activation priors must cover the same layers")
        if not self.importance_layers:
            self.importance_layers, self.importance_head = combine(
                self.param_diff + [self.head_param_diff], self.act_diff + [self.head_act_diff])

    @property
    def num_layers(self) -> int:
        return len(self.param_diff)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LayerPrior":
        keys = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in keys})


def combine(param: Sequence[float], act: Sequence[float]) -> tuple[list[float], float]:
    """Normalise each signal, average, smooth across layers, clip; last entry is the head."""
    p, a = robust_normalise(param), robust_normalise(act)
    avg = [(x + y) / 2 for x, y in zip(p, a)]
    layers, head = smooth(avg[:-1]), avg[-1]
    lo, hi = CLIP
    return [min(hi, max(lo, v)) for v in layers], min(hi, max(lo, head))

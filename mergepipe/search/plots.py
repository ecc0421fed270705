"""Pictures of a search: the Pareto front on the anchored map, and hypervolume over time."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mergepipe.search.objectives import REF_POINT, hypervolume_trace  # noqa: E402


def pareto_plot(points: Sequence[Sequence[float]], front: Sequence[Sequence[float]],
                path: str | Path, title: str = "", labels: Sequence[str] = ()) -> Path:
    """Every finished trial, the front joined up, and the two sources at their anchors."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    if points:
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, c="#9aa5b1",
                   label="trials")
    if front:
        f = sorted(front)
        ax.plot([p[0] for p in f], [p[1] for p in f], "o-", c="#c0392b", ms=5,
                label="Pareto front")
        for p, lab in zip(sorted(front), labels):
            ax.annotate(lab, p, fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([0, 1], [1, 0], marker="*", s=140, c="#2c3e50", zorder=5, label="sources")
    ax.annotate("base", (0, 1), xytext=(5, -10), textcoords="offset points", fontsize=8)
    ax.annotate("reasoning", (1, 0), xytext=(-50, 6), textcoords="offset points", fontsize=8)
    ax.axvline(REF_POINT[0], c="#ddd", lw=0.8)
    ax.axhline(REF_POINT[1], c="#ddd", lw=0.8)
    ax.set_xlabel("accuracy (0 = base, 1 = reasoning)")
    ax.set_ylabel("token saving (0 = reasoning, 1 = base)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def hypervolume_plot(series: dict[str, tuple[Sequence[float], Sequence[Sequence[float]]]],
                     path: str | Path, title: str = "") -> Path:
    """``series[label] = (seconds since start, objectives in finishing order)``."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, (times, Y) in series.items():
        hv = hypervolume_trace(Y)
        ax.step(list(times), hv, where="post", label=label)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("hypervolume (ref −0.2, −0.2)")
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def series_from_trials(rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Seconds since the first submission and objectives, in finishing order."""
    if not rows:
        return [], []
    t0 = min(r["submitted_at"] or r["started_at"] for r in rows)
    return ([(r["finished_at"] - t0).total_seconds() for r in rows],
            [[r["f_acc"], r["f_cost"]] for r in rows])

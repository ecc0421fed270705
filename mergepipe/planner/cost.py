"""A time estimate for a plan, calibrated on the runs this catalog has recorded.

Merges here are I/O-bound, so wall time is modelled as
``s_read·bytes_read + s_write·bytes_written + overhead`` and fitted by least
squares (non-negative) on past committed runs. With fewer than three runs the
model falls back to one overall seconds-per-byte figure, and with none it says
it has nothing to go on rather than inventing a number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import Catalog
from mergepipe.planner.plan import Plan


@dataclass
class CostModel:
    s_read: float
    s_write: float
    overhead: float
    runs: int

    def predict(self, bytes_read: int, bytes_written: int) -> float:
        return self.s_read * bytes_read + self.s_write * bytes_written + self.overhead

    def predict_plan(self, plan: Plan) -> float:
        est = plan.est_bytes()
        return self.predict(est["base"] + est["experts"], est["out"])


def fit_cost_model(cat: Catalog) -> CostModel | None:
    """Fit on committed runs with measured bytes and time; None when there are none."""
    r = schema.runs
    rows = cat.rows(sa.select(r.c.bytes_read_base, r.c.bytes_read_experts, r.c.bytes_written,
                              r.c.wall_s).where(r.c.status == "COMMITTED", r.c.wall_s.is_not(None)))
    rows = [x for x in rows if x["bytes_written"]]
    if not rows:
        return None
    read = np.array([(x["bytes_read_base"] or 0) + (x["bytes_read_experts"] or 0) for x in rows], float)
    wrote = np.array([x["bytes_written"] for x in rows], float)
    wall = np.array([x["wall_s"] for x in rows], float)
    if len(rows) >= 3:
        design = np.stack([read, wrote, np.ones_like(read)], axis=1)
        coef, *_ = np.linalg.lstsq(design, wall, rcond=None)
        if (coef >= 0).all():
            return CostModel(float(coef[0]), float(coef[1]), float(coef[2]), len(rows))
    per_byte = float(wall.sum() / max(1.0, (read + wrote).sum()))
    return CostModel(per_byte, per_byte, 0.0, len(rows))

"""Utilisation, split into the coordinator's part and the budget's drain."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from mergepipe.search.report import timing

T0 = datetime(2026, 1, 1)


def _trial(worker: str, start: float, end: float) -> dict:
    at = T0 + timedelta(seconds=start)
    return {"status": "DONE", "worker": f"s1.{worker}", "submitted_at": at, "started_at": at,
            "finished_at": T0 + timedelta(seconds=end)}


def test_idle_time_after_the_last_handout_is_the_drain():
    # w0 runs one long trial; w1 runs two short ones, the second handed out at t = 2,
    # then has nothing left: 8 s of its 10 are drain, none is the coordinator's
    t = timing([_trial("w0", 0, 10), _trial("w1", 0, 2), _trial("w1", 2, 4)], workers=2)
    assert t["wall_s"] == 10 and t["busy_s"] == 14
    assert t["utilisation"] == pytest.approx(0.7)
    assert t["drain_idle"] == pytest.approx(0.3)
    assert t["utilisation_while_work_left"] == pytest.approx(1.0)


def test_a_worker_waiting_for_work_counts_against_the_coordinator():
    # w1 waits 1 s between its trials while work remains
    t = timing([_trial("w0", 0, 4), _trial("w1", 0, 1), _trial("w1", 2, 4)], workers=2)
    assert t["utilisation"] == pytest.approx(7 / 8)
    assert t["drain_idle"] == pytest.approx(0.0)
    assert t["utilisation_while_work_left"] == pytest.approx(3 / 4)

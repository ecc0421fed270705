"""Fault injection for crash tests: the process kills itself at a named point.

``MERGEPIPE_CRASH_AT=mid_write`` (or before_manifest, after_manifest,
after_rename, after_commit) sends SIGKILL to the running process there, so
tests can prove that every instant of a commit is recoverable.
"""
from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("MERGEPIPE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

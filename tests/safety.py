"""Helpers for the adversarial tests: a refused command must change nothing.

The contract every case asserts: one `error: …` line naming the problem, a
nonzero exit, the same catalog rows, and the same files on disk (nothing left
behind, nothing deleted) in the folders the case watches.
"""
from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import Cli, write_spec


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: path -> (size, mtime_ns). The catalog
    file itself is left out: opening it rewrites it, and its rows are compared."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                if n.startswith("catalog.duckdb"):
                    assert p.is_file()
                    continue
                st = p.lstat()
                out[str(p)] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns
                               if not p.is_dir() else 0)
    return out


def snapshot(cli: Cli) -> dict[str, list]:
    """Every catalog row (as ``Cli.snapshot``), read through a read-only handle: quicker,
    and it cannot change what it looks at."""
    from mergepipe.catalog import schema
    from mergepipe.catalog.store import open_catalog
    with open_catalog(cli.home, read_only=True) as cat:
        return {t.name: sorted(map(repr, cat.rows(sa.select(t))))
                for t in schema.metadata.sorted_tables}


def one_line_error(res, needle: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code != 0, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.output
    return lines[0]


def refused(cli: Cli, args: list, needle: str, watch: list[Path]) -> str:
    """Run a command that must fail cleanly; returns its error line."""
    cli("init")
    before, files = snapshot(cli), tree(*watch)
    res = cli(*args, ok=False)
    line = one_line_error(res, needle)
    assert snapshot(cli) == before
    assert tree(*watch) == files
    return line


def models(cli: Cli) -> dict[str, dict]:
    from mergepipe.catalog import schema
    from mergepipe.catalog.store import open_catalog
    with open_catalog(cli.home) as cat:
        return {r["name"]: r for r in cat.rows(sa.select(schema.models))}


def ta_spec(path: Path, base: Path | str, experts: list[Path | str], params: str = "{weight: 0.5}",
            extra: str = "") -> Path:
    body = "\n".join(f"  - model: {e}\n    parameters: {params}" for e in experts)
    return write_spec(path, f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                            f"{body}\n{extra}")

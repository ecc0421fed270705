"""Shared CLI plumbing: the workspace handle, error handling and output formats."""
from __future__ import annotations

import csv
import errno
import io
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import click

from mergepipe.catalog.store import Catalog, open_catalog
from mergepipe.errors import MergePipeError


@dataclass
class Workspace:
    """What the top-level options select: where the catalog lives."""

    home: str | None = None
    catalog_url: str | None = None

    def open(self, read_only: bool = False) -> Catalog:
        return open_catalog(self.home, self.catalog_url, read_only=read_only)


class MergePipeGroup(click.Group):
    """Turns every expected failure into one `error: …` line on stderr and a nonzero
    exit: MergePipeError, OS errors (permissions, disk full, not a directory:
    the message names the path) and click's usage errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MergePipeError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            click.echo(f"error: {os_error_line(exc)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


def os_error_line(exc: OSError) -> str:
    """`<what went wrong>: <path>` in one line, as the OS reports it."""
    what = exc.strerror or exc.__class__.__name__
    if exc.errno == errno.ENOSPC or exc.errno == errno.EFBIG:
        what += " (no room left to write the output)"
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    line = f"{what}: {' -> '.join(map(str, paths))}" if paths else what
    return " ".join(line.split())


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, default=str))


def format_rows(rows: Sequence[dict[str, Any]], fmt: str = "table",
                columns: Sequence[str] | None = None) -> str:
    """Render rows as an aligned text table, CSV, or JSON lines."""
    cols = list(columns) if columns else (list(rows[0].keys()) if rows else [])
    if fmt == "json":
        return "\n".join(json.dumps({c: r.get(c) for c in cols}, default=str) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(c) for c in cols])
        return buf.getvalue().rstrip("\n")
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths))
              for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _numeric(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def stderr_progress() -> bool:
    """Progress bars only for a person watching a terminal."""
    return sys.stderr.isatty()


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    click.echo(format_rows(list(rows), "table", columns))

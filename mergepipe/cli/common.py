"""Shared CLI plumbing: the workspace handle, error handling and output formats."""
from __future__ import annotations

import errno
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from mergepipe import api
from mergepipe.errors import MergePipeError
from mergepipe.text import format_rows


@dataclass
class Workspace:
    """What the top-level options select: where the catalog lives."""

    home: str | None = None
    catalog_url: str | None = None

    def open(self, read_only: bool = False) -> "api.Catalog":
        return api.open_catalog(self.home, self.catalog_url, read_only=read_only)

    @property
    def home_dir(self) -> Path:
        """Where searches and the demo write (the workspace directory)."""
        return api.workspace_home(self.home)


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


def stderr_progress() -> bool:
    """Progress bars only for a person watching a terminal."""
    return sys.stderr.isatty()


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    click.echo(format_rows(list(rows), "table", columns))

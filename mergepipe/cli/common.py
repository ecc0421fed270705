"""Shared CLI plumbing: the workspace handle, error handling and output formats."""
from __future__ import annotations

import errno
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NoReturn, Sequence

import click
from click.exceptions import NoArgsIsHelpError

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
    the message names the path) and click's usage errors (unknown command or
    option, missing argument, bad value), whether click meets them while parsing
    this group's own arguments or inside a subcommand. A group called without a
    command prints its help, as ``--help`` does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_class = type(self)  # subgroups (search, world) handle errors alike

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            click.echo(ctx.get_help())
            ctx.exit(0)
        except click.UsageError as exc:
            fail(ctx, usage_line(exc), exc.exit_code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MergePipeError as exc:
            fail(ctx, str(exc), exc.exit_code)
        except click.UsageError as exc:
            fail(ctx, usage_line(exc), exc.exit_code)
        except click.ClickException as exc:  # e.g. a file click could not open
            fail(ctx, exc.format_message(), exc.exit_code)
        except OSError as exc:
            fail(ctx, os_error_line(exc), 1)
        except (KeyboardInterrupt, click.Abort):
            fail(ctx, "interrupted", 130)
        except (click.exceptions.Exit, SystemExit):
            raise
        except Exception as exc:  # a bug or a library's refusal we did not foresee
            if os.environ.get("MERGEPIPE_DEBUG"):
                raise
            fail(ctx, f"unexpected {type(exc).__name__}: {exc} (MERGEPIPE_DEBUG=1 shows "
                      f"the traceback)", 1)


def fail(ctx: click.Context, message: str, code: int) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with ``code`` (never 0)."""
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    ctx.exit(code or 1)


def usage_line(exc: click.UsageError) -> str:
    """Click's usage error in one line, pointing at the command's --help."""
    msg = " ".join(exc.format_message().split()).rstrip(".")
    where = exc.ctx.command_path if exc.ctx is not None else "mergepipe"
    return f"{msg} (see '{where} --help')"


def os_error_line(exc: OSError) -> str:
    """`<what went wrong>: <path>` in one line, as the OS reports it."""
    what = exc.strerror or exc.__class__.__name__
    if exc.errno == errno.ENOSPC or exc.errno == errno.EFBIG:
        what += " (no room left to write the output)"
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    line = f"{what}: {' -> '.join(map(str, paths))}" if paths else what
    return " ".join(line.split())


class Device(click.ParamType):
    """A torch device string, checked here so a typo is a usage error, not a traceback."""

    name = "device"
    PATTERN = re.compile(r"(cpu|mps|(cuda|xpu)(:\d+)?)")

    def __init__(self, allow_auto: bool = False):
        self.allow_auto = allow_auto

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value).strip()
        if (self.allow_auto and text == "auto") or self.PATTERN.fullmatch(text):
            return text
        forms = "cpu, cuda, cuda:N, mps, xpu:N" + (" or auto" if self.allow_auto else "")
        self.fail(f"{value!r} is not a device ({forms})", param, ctx)


format_option = click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
    show_default=True,
    help="table: aligned columns for people; csv: a header row, then one row per line; "
         "json: one JSON object per row, one per line.")


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, default=str))


def stderr_progress() -> bool:
    """Progress bars only for a person watching a terminal."""
    return sys.stderr.isatty()


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    click.echo(format_rows(list(rows), "table", columns))

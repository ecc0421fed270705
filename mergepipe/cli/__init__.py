"""`mergepipe` command line: a thin skin over the library.

Each command parses arguments and calls one library function; errors derived
from :class:`MergePipeError` become a one-line ``error: …`` and a nonzero exit.
Command groups live in sibling modules named after what they do.
"""
from __future__ import annotations

import sys

import click

from mergepipe.arenas import limit_malloc_arenas
from mergepipe.cli.common import MergePipeGroup, Workspace


@click.group("mergepipe", cls=MergePipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), envvar="MERGEPIPE_HOME",
              help="Workspace directory (catalog at DIR/catalog.duckdb). "
                   "Default: $MERGEPIPE_HOME or ~/.mergepipe.")
@click.option("--catalog", "catalog_url", metavar="URL",
              help="SQLAlchemy URL of the catalog (e.g. postgresql://…); overrides --home.")
@click.pass_context
def cli(ctx: click.Context, home: str | None, catalog_url: str | None) -> None:
    """MergePipe: plan, run and record LLM merges like a database.

    New here? `mergepipe demo` runs the whole job on a built-in tiny model
    family; the README's session continues from it. Errors are one line,
    `error: …`, with a nonzero exit.

    \b
    Typical session:
      mergepipe register ./base-model --name base
      mergepipe register ./expert-a --name a
      mergepipe plan ties.yml            # store the plan, show its I/O cost
      mergepipe apply ties.yml --out ./merged --name merged
      mergepipe sql "SELECT * FROM lineage_view"
    """
    ctx.obj = Workspace(home=home, catalog_url=catalog_url)


def _load_commands() -> None:
    """Import every command module in this package; each registers on ``cli``."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "common":
            importlib.import_module(f"mergepipe.cli.{info.name}")


_load_commands()


def main() -> None:
    limit_malloc_arenas()   # before the catalog's threads make arenas of their own
    cli(prog_name="mergepipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

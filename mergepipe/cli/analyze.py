"""`mergepipe analyze`: block statistics of experts against a base, computed once."""
from __future__ import annotations

import click

from mergepipe import api
from mergepipe.cli import cli
from mergepipe.cli.common import echo_json, stderr_progress
from mergepipe.text import human_bytes


@cli.command()
@click.argument("experts", nargs=-1, required=True)
@click.option("--base", required=True, help="Base model (catalog name or directory).")
@click.option("--block-size", default="1MiB", show_default=True,
              help="Bytes per block (rows are never split; a block is one byte range).")
@click.option("--force", is_flag=True, help="Recompute even when the stats are up to date.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def analyze(ws, experts: tuple[str, ...], base: str, block_size: str, force: bool,
            as_json: bool) -> None:
    """Store per-block delta norms of each EXPERT against --base (names or directories).

    Budgeted plans rank expert blocks with these numbers. Experts whose stats
    are current are skipped; a model whose files changed is re-registered and
    re-analysed.
    """
    with ws.open() as cat:
        rep = api.analyze(cat, list(experts), base, block_size=block_size,
                          progress=stderr_progress(), force=force)
    if as_json:
        echo_json(rep.__dict__)
        return
    if rep.analyzed:
        click.echo(f"analyzed {', '.join(rep.analyzed)} against {rep.base}: {rep.blocks} blocks, "
                   f"read {human_bytes(rep.bytes_read)} in {rep.wall_s:.2f} s")
    if rep.up_to_date:
        click.echo(f"up to date: {', '.join(rep.up_to_date)}")
    if not rep.analyzed:
        click.echo(f"read {human_bytes(rep.bytes_read)} in {rep.wall_s:.2f} s")

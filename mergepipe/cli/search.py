"""`mergepipe search …`: run, watch, resume and harvest AP-BMM and baseline searches."""
from __future__ import annotations

from typing import Any

import click

from mergepipe import api
from mergepipe.cli import cli
from mergepipe.cli.common import echo_json, stderr_progress, table
from mergepipe.errors import CatalogLockedError

FINAL_FIELDS = ("search_id", "algorithm", "status", "trials", "hypervolume",
                "hypervolume_with_sources", "utilisation", "wall_s", "pareto",
                "beaten_by_sources", "failed")


def _final(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json({k: summary.get(k) for k in FINAL_FIELDS})
    else:
        click.echo(f"search {summary['search_id']} {summary['status'].lower()}: "
                   f"{summary['trials']} trials, hypervolume {summary['hypervolume']:.4f} "
                   f"({summary['hypervolume_with_sources']:.4f} with the sources), "
                   f"utilisation {summary['utilisation']:.0%}, {summary['pareto']} on the front, "
                   f"{summary['beaten_by_sources']} no better than a source", err=True)


@cli.group()
def search() -> None:
    """Multi-objective layer-wise merge search (AP-BMM) and its baselines."""


class RunCommand(click.Command):
    """`search run`, whose help lists the config keys and algorithms (read at --help time)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Config keys (YAML)"):
            formatter.write_dl([(key, f"{meaning} [default: {default}]")
                                for key, default, meaning in api.search_config_keys()])
        with formatter.section("Algorithms"):
            formatter.write_dl(list(api.search_algorithms().items()))
        formatter.write_paragraph()
        formatter.write_text("An unknown key is refused. Example:")
        formatter.write_paragraph()
        with formatter.indentation():
            for line in RUN_EXAMPLE:
                formatter.write_text(line)


RUN_EXAMPLE = ("base: base", "reasoning: reasoning", "tasks: [./world/test.jsonl]",
               "algorithm: apbmm", "n_init: 8", "n_total: 40", "workers: 4")


@search.command("run", cls=RunCommand)
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@click.option("--keep-all", is_flag=True, help="Keep every merged checkpoint, not only the front.")
@click.pass_obj
def run_cmd(ws, config: str, as_json: bool, keep_all: bool) -> None:
    """Run the search CONFIG.yml describes (base, reasoning, tasks, algorithm, budget).

    Prints the search id first (resume it with `mergepipe search resume ID` if the
    run is interrupted). Merged checkpoints off the Pareto front are deleted as the
    search goes unless --keep-all.
    """
    cfg = api.load_search_config(config)
    with ws.open() as cat:
        summary = api.start_search(
            cat, cfg, ws.home_dir, progress=stderr_progress(), keep_all=keep_all,
            lines=not stderr_progress(),
            on_start=lambda sid: click.echo(sid if not as_json else f"search {sid} started",
                                            err=as_json))
    _final(summary, as_json)


@search.command("resume")
@click.argument("search_id")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
@click.pass_obj
def resume_cmd(ws, search_id: str, as_json: bool) -> None:
    """Continue an interrupted search: finished trials are kept, in-flight ones re-run."""
    with ws.open() as cat:
        summary = api.resume_search(cat, search_id, ws.home_dir, progress=stderr_progress(),
                                    lines=not stderr_progress())
    _final(summary, as_json)


@search.command("status")
@click.argument("search_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per search.")
@click.pass_obj
def status_cmd(ws, search_id: str | None, as_json: bool) -> None:
    """Trials, hypervolume and utilisation of one search (or all, oldest first)."""
    try:
        with ws.open(read_only=True) as cat:
            rows = api.search_status(cat, search_id)
    except CatalogLockedError:
        # A running search holds the catalog; read the status it publishes instead.
        rows = api.search_snapshots(ws.home_dir, search_id)
        if not rows:
            raise
    if as_json:
        for r in rows:
            echo_json(r)
    else:
        table(rows, ["search_id", "algorithm", "status", "trials", "n_total", "failed",
                     "hypervolume", "utilisation", "pareto", "wall_s"])


@search.command("pareto")
@click.argument("search_id")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the Pareto plot (PNG).")
@click.option("--hv-plot", type=click.Path(dir_okay=False),
              help="Write hypervolume over wall time (PNG).")
@click.option("--materialize", is_flag=True,
              help="Re-create any front model whose checkpoint is missing from disk.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per front model.")
@click.pass_obj
def pareto_cmd(ws, search_id: str, plot: str | None, hv_plot: str | None, materialize: bool,
               as_json: bool) -> None:
    """The Pareto set as named models, with lineage and evaluations."""
    with ws.open() as cat:
        rows = api.search_front(cat, search_id, materialize=materialize, home=ws.home_dir,
                                plot=plot, hv_plot=hv_plot)
    if as_json:
        for r in rows:
            echo_json(r)
    else:
        table(rows, ["trial", "model", "f_acc", "f_cost", "accuracy", "mean_tokens",
                     "weight", "on_disk", "path"])
    for p in (plot, hv_plot):
        if p:
            click.echo(f"wrote {p}", err=True)

"""Core commands: register, models, plan, explain, apply, lineage, sql, verify, recover."""
from __future__ import annotations

import click

from mergepipe import api
from mergepipe.cli import cli
from mergepipe.cli.common import Device, echo_json, format_option, stderr_progress, table
from mergepipe.errors import MergePipeError
from mergepipe.text import format_rows, human_bytes


@cli.command()
@click.pass_obj
def init(ws) -> None:
    """Create the workspace catalog (other commands do this on first use)."""
    with ws.open() as cat:
        click.echo(f"catalog ready: {cat.url}")


@cli.command()
@click.argument("path", metavar="PATH|ORG/NAME[@REV]")
@click.option("--name", help="Catalog name (default: the folder's or hub repo's name; when "
              "another model holds it, a longer one such as parent-folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the model row as JSON.")
@click.pass_obj
def register(ws, path: str, name: str | None, as_json: bool) -> None:
    """Index a Hugging Face safetensors model directory (weights are not copied).

    PATH may also be a hub id, org/name or org/name@revision: it is taken from
    the local Hugging Face cache (HF_HUB_CACHE, HF_HOME), downloaded first when
    online, and recorded with its repo id and commit (models.repo_id, revision).
    Reads every shard header, records each tensor's layer, module, shard, byte
    range, dtype and shape, and hashes tensor contents. Re-registering an
    unchanged directory does nothing; a changed one is re-indexed.
    """
    with ws.open() as cat:
        row = api.register(cat, path, name=name, progress=stderr_progress())
    if as_json:
        echo_json({k: v for k, v in row.items() if k != "config_json"})
    else:
        click.echo(f"registered {row['name']}: {row['num_params']:,} params, "
                   f"{human_bytes(row['total_bytes'])}, {row['num_layers']} layers ({row['path']})")


@cli.command()
@format_option
@click.pass_obj
def models(ws, fmt: str) -> None:
    """List registered and merged models."""
    with ws.open() as cat:
        rows = api.models(cat)
    if fmt == "table":
        for r in rows:
            r["total_bytes"] = human_bytes(r["total_bytes"])
    click.echo(format_rows(rows, fmt))


budget_option = click.option(
    "--io-budget", metavar="SIZE|PCT",
    help="Cap on bytes read from expert files: an absolute size (2GiB) or a share of "
         "the full expert reads (10%). Blocks are chosen by delta energy per byte.")
seed_option = click.option("--seed", type=int, help="Seed for stochastic methods "
                           "(overrides the spec's `seed`).")


def _print_summary(plan) -> None:
    for line in api.plan_lines(plan):
        click.echo(line)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@budget_option
@seed_option
@click.option("--no-analyze", is_flag=True, help="Fail instead of computing missing block statistics.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan summary as JSON.")
@click.pass_obj
def plan(ws, spec: str, io_budget: str | None, seed: int | None, no_analyze: bool,
         as_json: bool) -> None:
    """Plan a merge from a YAML spec (mergekit configs accepted) and store it.

    Prints the plan id and what it will read and write. Nothing is merged.
    """
    with ws.open() as cat:
        p = api.build_plan(cat, spec, io_budget=io_budget, seed=seed, analyze=not no_analyze,
                           progress=stderr_progress())
    if as_json:
        echo_json(api.plan_summary(p))
    else:
        _print_summary(p)


@cli.command()
@click.argument("plan_or_run")
@format_option
@click.pass_obj
def explain(ws, plan_or_run: str, fmt: str) -> None:
    """Show a plan's reads per layer and model (PLAN_ID, or RUN_ID to compare with the run)."""
    with ws.open() as cat:
        ex = api.explain(cat, plan_or_run)
    rows = ex["rows"]
    if fmt != "table":
        click.echo(format_rows(rows, fmt))
        return
    for line in ex["lines"]:
        click.echo(line)
    for r in rows:
        r["read"], r["skipped"] = human_bytes(r["read"]), human_bytes(r["skipped"])
    table(rows)
    for line in ex["extra_lines"]:
        click.echo(line)


@cli.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--plan", "plan_id", help="Apply a stored plan instead of a spec.")
@click.option("--out", required=True, type=click.Path(), help="Output model directory.")
@click.option("--name", help="Catalog name of the merged model (default: the output directory name).")
@click.option("--overwrite", is_flag=True, help="Replace a previous merge output at --out (atomic); "
              "a registered model, an input, the workspace or a folder holding one is never "
              "replaced.")
@budget_option
@seed_option
@click.option("--no-analyze", is_flag=True, help="Fail instead of computing missing block statistics.")
@click.option("--device", type=Device(), default="cpu", show_default=True,
              help="Compute device (cpu, cuda, cuda:1).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge even if an input holds NaN/Inf.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object describing the run.")
@click.pass_obj
def apply(ws, spec: str | None, plan_id: str | None, out: str, name: str | None, overwrite: bool,
          io_budget: str | None, seed: int | None, no_analyze: bool, device: str,
          allow_nonfinite: bool, as_json: bool) -> None:
    """Plan (or load) a merge and execute it transactionally into --out.

    Output is written to a staging directory beside --out, fsynced, described
    by a manifest, and renamed into place; the catalog records the run, the new
    model and its lineage. A plan already committed at --out returns that commit;
    one committed elsewhere is materialised at --out from that commit's files
    (hard links where the file system allows, else copies), verified and
    recorded under --name ("reused").
    """
    if bool(spec) == bool(plan_id):
        raise MergePipeError("give either a SPEC file or --plan PLAN_ID")
    if plan_id and (io_budget or seed is not None):
        raise MergePipeError("--io-budget/--seed apply when planning; plan again with them")
    with ws.open() as cat:
        api.check_output(cat, out, overwrite, name, existing_ok=True)  # before planning
        if plan_id:
            p, inserted = api.load_plan(cat, plan_id), False
        else:
            p, inserted = api.build_and_store(cat, spec, io_budget=io_budget, seed=seed,
                                              analyze=not no_analyze, progress=stderr_progress())
        result = api.apply_plan(cat, p, out, name=name, overwrite=overwrite, device=device,
                                allow_nonfinite=allow_nonfinite, progress=stderr_progress(),
                                plan_inserted=inserted)
    if as_json:
        echo_json(result.to_json())
        return
    if result.reused and not result.reused_from:
        click.echo(f"reused: plan {result.plan_id[:12]} is already committed as "
                   f"{result.model} at {result.out}; nothing written")
        return
    if result.reused:
        click.echo(f"committed {result.model} at {result.out} (reused the commit of plan "
                   f"{result.plan_id[:12]} at {result.reused_from})")
        click.echo(f"  run {result.run_id[:12]}  {result.wall_s:.2f} s  "
                   f"{result.linked_files} files hard-linked, {result.copied_files} copied "
                   f"({human_bytes(result.bytes_written)}); verified")
        return
    click.echo(f"committed {result.model} at {result.out}")
    click.echo(f"  plan {result.plan_id[:12]}  run {result.run_id[:12]}  {result.wall_s:.2f} s")
    click.echo(f"  read base {human_bytes(result.bytes_read['base'])}, experts "
               f"{human_bytes(result.bytes_read['experts'])}; wrote {human_bytes(result.bytes_written)}")


@cli.command()
@click.argument("name")
@format_option
@click.pass_obj
def lineage(ws, name: str, fmt: str) -> None:
    """Show the full ancestry of a model (recursive over lineage edges)."""
    with ws.open() as cat:
        rows = api.lineage(cat, name)
    if not rows and fmt == "table":
        click.echo(f"{name} has no recorded parents (a source model)")
        return
    for r in rows:
        r["plan_id"] = r["plan_id"][:12]
    click.echo(format_rows(rows, fmt))


@cli.command()
@click.argument("query")
@format_option
@click.option("--timeout", type=float, default=api.DEFAULT_SQL_TIMEOUT, show_default=True,
              help="Stop the query after this many seconds.")
@click.pass_obj
def sql(ws, query: str, fmt: str, timeout: float) -> None:
    """Run a read-only SQL query over the catalog.

    The catalog is opened read-only and the query cannot read or write files
    or URLs; it is stopped after --timeout seconds. DuckDB lets no other
    process open the catalog, even read-only, while one writes it (an apply):
    `sql` then fails with one line naming that process.

    \b
    Tables: models, files, tensors, plans, runs, reuses, lineage,
    lineage_layers, block_stats, evaluations, searches, trials. Views:
    lineage_view (one row per parent; weight, or weights when they vary by
    layer), lineage_layers_view (one row per parent and layer), runs_view,
    evaluations_view. Example:
      mergepipe sql "SELECT child, layer, weight FROM lineage_layers_view WHERE parent = 'math'"
    """
    with ws.open(read_only=True) as cat:
        rows = api.run_sql(cat, query, timeout=timeout)
    click.echo(format_rows(rows, fmt))


@cli.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: path, plan_id, tensors, ok, problems (and "
                   "exit nonzero when not ok).")
def verify(path: str, as_json: bool) -> None:
    """Re-hash a merged model's tensors against its manifest."""
    res = api.verify(path)
    if as_json:
        echo_json(res.__dict__)
    elif res.ok:
        click.echo(f"ok: {res.tensors} tensors match the manifest (plan {res.plan_id[:12]})")
    if not res.ok:
        raise MergePipeError(f"{path}: {len(res.problems)} problem(s): {res.problems[0]}")


@cli.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: the run ids completed and rolled back, and "
                   "the staging directories removed.")
@click.pass_obj
def recover(ws, as_json: bool) -> None:
    """Finish or roll back merges interrupted by a crash; remove staging directories."""
    with ws.open() as cat:
        rep = api.recover(cat)
    if as_json:
        echo_json(rep.__dict__)
        return
    click.echo(f"completed {len(rep.completed)}, rolled back {len(rep.rolled_back)}, "
               f"removed {len(rep.removed_dirs)} director{'y' if len(rep.removed_dirs) == 1 else 'ies'}")

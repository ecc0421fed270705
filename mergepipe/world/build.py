"""Build a world: problems, shared pretraining, two fine-tunes, saved checkpoints.

The pretrained model reads arithmetic text with every amount of written work; `base` is then
fine-tuned to answer directly and `reasoning` to write every step (in the default
world each keeps a share of the other style, see `finetune_text`). Both start
from the same weights, so the straight line between them is a meaningful family
of merges (the search layer's setting). Builds are cached by recipe key and
written to a staging directory first, so an interrupted build leaves nothing.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

from mergepipe.evaluate.hf import quiet_transformers
from mergepipe.errors import MergePipeError
from mergepipe.files import pid_alive
from mergepipe.world.problems import Problem, sample, write_jsonl
from mergepipe.world.recipe import WorldRecipe, recipe_for
from mergepipe.world.tokenizer import build_tokenizer
from mergepipe.world.train import Example, encode, new_model, train

WORLD_FILES = ("base", "reasoning", "train.jsonl", "test.jsonl", "world.json")


def cache_root() -> Path:
    env = os.environ.get("MERGEPIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergepipe"


def split_problems(recipe: WorldRecipe) -> tuple[list[Problem], list[Problem]]:
    """Held-out test problems first, then training problems that avoid them."""
    test = sample(random.Random(recipe.seed + 1), recipe.n_test, recipe.min_steps,
                  recipe.max_steps, modulus=recipe.modulus)
    train_set = sample(random.Random(recipe.seed + 2), recipe.n_train, recipe.min_steps,
                       recipe.max_steps, exclude={p.expression for p in test},
                       modulus=recipe.modulus)
    return train_set, test


def pretraining_text(problems: list[Problem], recipe: WorldRecipe) -> list[Example]:
    """Arithmetic text with loss on the whole sequence, in the habit of someone
    who shows their work more often the longer the chain is.

    Short chains are mostly answered outright and long ones mostly worked
    through, so the shared starting point already links difficulty to written
    work: merges between the two fine-tunes then write steps on hard problems
    first, and direct answering stays weak where it was rarely practised.
    """
    rng = random.Random(recipe.seed + 3)
    floor, span = recipe.show_work_floor, max(1, recipe.max_steps - recipe.min_steps)
    out = []
    for p in problems:
        show_work = floor + (1 - floor) * (p.steps - recipe.min_steps) / span
        for _ in range(2):
            style = p.reasoning() if rng.random() < show_work else p.direct()
            out.append(Example(p.prompt, style, full=True))
    return out


def finetune_text(problems: list[Problem], recipe: WorldRecipe, name: str) -> list[Example]:
    """One completion per problem in the model's own style, except a share per
    chain length (`base_worked_share`, `reasoning_direct_share`) in the other.

    Greedy decoding still gives one style everywhere, but the decision's margin
    now follows the shares: base answers long chains directly by a thin margin,
    reasoning writes short chains out by a thin margin. Mixes between them then
    start writing on the longest chains and reach the shortest last.
    """
    own, other = ((Problem.direct, Problem.reasoning) if name == "base"
                  else (Problem.reasoning, Problem.direct))
    shares = recipe.base_worked_share if name == "base" else recipe.reasoning_direct_share
    if not shares:
        return [Example(p.prompt, own(p)) for p in problems]
    rng = random.Random(recipe.seed + (4 if name == "base" else 5))
    return [Example(p.prompt, (other if rng.random() < shares[p.steps - recipe.min_steps]
                               else own)(p)) for p in problems]


@contextmanager
def _fixed_numerics(threads: int) -> Iterator[None]:
    """Pin the thread count (reductions split by thread) and flush denormals
    (tiny AdamW updates otherwise hit slow CPU paths); restore both after."""
    before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


def _remove_dead_stagings(out: Path) -> None:
    """Staging directories left by killed builds (their pid is gone)."""
    for stale in out.parent.glob(out.name + ".staging-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def build_world(recipe: WorldRecipe, out: Path, log: bool = False) -> dict:
    """Build into `out` (created fresh via a staging directory); returns timings."""
    out = Path(out)
    _remove_dead_stagings(out)
    stage = out.with_name(out.name + f".staging-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    with _fixed_numerics(recipe.threads):
        tok = build_tokenizer()
        train_set, test = split_problems(recipe)
        write_jsonl(train_set, stage / "train.jsonl")
        write_jsonl(test, stage / "test.jsonl")
        model = new_model(recipe, tok)
        pad = tok.pad_token_id
        text = encode(tok, pretraining_text(train_set, recipe))
        losses = train(model, text, recipe.pretrain_steps, recipe.pretrain_lr,
                       recipe.batch_size, recipe.seed, pad)
        timings["pretrain_s"] = time.perf_counter() - t0
        if log:
            print(f"pretrain: {recipe.pretrain_steps} steps, loss {losses[-1]:.3f}, "
                  f"{timings['pretrain_s']:.1f}s", file=sys.stderr, flush=True)
        for i, name in enumerate(("base", "reasoning")):
            t1 = time.perf_counter()
            tuned = copy.deepcopy(model)
            data = encode(tok, finetune_text(train_set, recipe, name))
            losses = train(tuned, data, recipe.finetune_steps, recipe.finetune_lr,
                           recipe.batch_size, recipe.seed + 10 + i, pad)
            with quiet_transformers():
                tuned.save_pretrained(stage / name)
                tok.save_pretrained(stage / name)
            timings[f"{name}_s"] = time.perf_counter() - t1
            if log:
                print(f"{name}: {recipe.finetune_steps} steps, loss {losses[-1]:.3f}, "
                      f"{timings[f'{name}_s']:.1f}s", file=sys.stderr, flush=True)
    (stage / "world.json").write_text(json.dumps(
        {"key": recipe.key(), "recipe": asdict(recipe)}, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)
    timings["total_s"] = time.perf_counter() - t0
    return timings


def obtain_world(size: str = "default", log: bool = False,
                 rebuild: bool = False) -> tuple[Path, dict[str, float]]:
    """The cached world for `size` and the build timings (empty when reused).

    Builds of one recipe are serialised by a file lock, so processes that ask
    at once (parallel tests, two shells) build it once and then share it."""
    from filelock import FileLock
    recipe = recipe_for(size)
    path = cache_root() / "world" / recipe.key()
    if not rebuild and (path / "world.json").exists():
        return path, {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not rebuild and (path / "world.json").exists():
            return path, {}  # another process built it while this one waited
        if log:
            print(f"building the {size} world into {path} (cached for next time)",
                  file=sys.stderr, flush=True)
        return path, build_world(recipe, path, log=log)


def ensure_world(size: str = "default", log: bool = False) -> Path:
    """The cached world for `size`, built on first use."""
    return obtain_world(size, log=log)[0]


def check_world_dest(dest: Path) -> None:
    """A world may be copied into a new or empty folder, or over an earlier copy of a
    world (its files are replaced); anything else is refused, before any build."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or
                          (any(dest.iterdir()) and not (dest / "world.json").exists())):
        raise MergePipeError(f"--dir {dest} exists and is not an earlier copy of a world "
                             f"(no world.json); choose a new or empty folder")


def copy_world(src: Path, dest: Path) -> None:
    """Materialise a cached world at a user-chosen directory (see :func:`check_world_dest`)."""
    dest = Path(dest)
    check_world_dest(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORLD_FILES:
        s, d = src / name, dest / name
        if s.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)

"""A tiny reasoning world: a reproducible base / reasoning model pair built on the CPU."""
from mergepipe.world.build import (build_world, cache_root, copy_world, ensure_world,
                                   obtain_world)
from mergepipe.world.recipe import SIZES, WorldRecipe, recipe_for
from mergepipe.world.tasks import resolve_task

__all__ = ["build_world", "cache_root", "copy_world", "ensure_world", "obtain_world", "SIZES",
           "WorldRecipe", "recipe_for", "resolve_task"]

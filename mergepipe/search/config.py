"""The search config (YAML), validated once so every later failure is about the search.

Light to import (no torch, no BoTorch): `mergepipe search run --help` lists the
keys, their defaults and the algorithms from here.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.runner import BACKENDS, DEFAULT_MAX_NEW_TOKENS

# name -> what it does; `search/algorithms.py` implements each under this name
ALGORITHM_HELP: dict[str, str] = {
    "apbmm": "asynchronous prior-guided Bayesian search: a GP per objective, qLogNEHVI with "
             "in-flight trials pending, gap-aware rerank (the default)",
    "sync-qnehvi": "the same surrogate and acquisition in synchronous batches, no prior",
    "sobol": "quasi-random layer-wise points (the shared initial design, continued)",
    "grid-ta": "one model-level task-arithmetic weight on an even grid",
    "grid-ties": "one model-level TIES weight on an even grid",
}
ALGORITHMS = tuple(ALGORITHM_HELP)
EVALUATORS = ("checkpoint", "resident")
POOLS = ("local", "ray")


@dataclass
class SearchConfig:
    """One search; every field is a YAML key (see KEY_HELP for what each means)."""

    base: str
    reasoning: str
    tasks: list[str]
    algorithm: str = "apbmm"
    n_init: int = 8
    n_total: int = 40
    workers: int = 4
    seed: int = 0
    limit: int | None = None
    group_size: int = 1
    io_budget: Any = None
    device: str = "cpu"
    probe: str | None = None
    probe_n: int = 32
    max_new_tokens: int | None = None
    stretch_alpha: float | None = None
    out_dir: str | None = None
    keep_all: bool = False
    evaluator: str = "checkpoint"
    backend: str = "transformers"
    pool: str = "local"
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise MergePipeError(f"unknown algorithm {self.algorithm!r}; choose one of "
                                 f"{', '.join(ALGORITHMS)}")
        if not self.tasks:
            raise MergePipeError("the search config needs at least one task (JSONL path)")
        if self.n_total < 1 or self.n_init < 0 or self.workers < 1:
            raise MergePipeError("n_total and workers must be at least 1, n_init at least 0")
        if self.evaluator not in EVALUATORS:
            raise MergePipeError(f"unknown evaluator {self.evaluator!r}; choose one of "
                                 f"{', '.join(EVALUATORS)}")
        if self.backend not in BACKENDS:
            raise MergePipeError(f"unknown backend {self.backend!r}; choose one of "
                                 f"{', '.join(BACKENDS)}")
        if self.pool not in POOLS:
            raise MergePipeError(f"unknown pool {self.pool!r}; choose one of {', '.join(POOLS)}")
        if self.group_size < 1:
            raise MergePipeError("group_size must be at least 1")
        for t in self.tasks:
            if not Path(t).is_file():
                raise MergePipeError(f"task file {t} does not exist")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path | None = None) -> "SearchConfig":
        """Build from a mapping; relative paths are taken relative to ``root``."""
        if not isinstance(data, dict):
            raise MergePipeError("a search config must be a mapping")
        known = {f.name for f in fields(cls)}
        if data.get("extra") == {}:  # configs stored by earlier versions carry an empty `extra`
            data = {k: v for k, v in data.items() if k != "extra"}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:  # a typo must not silently fall back to a default
            raise MergePipeError(f"unknown search config key {unknown[0]!r}"
                                 + (f" (and {', '.join(map(repr, unknown[1:]))})"
                                    if len(unknown) > 1 else "")
                                 + f"; known keys: {', '.join(sorted(known))}")
        missing = [k for k in ("base", "reasoning", "tasks") if k not in data]
        if missing:
            raise MergePipeError(f"search config is missing {', '.join(missing)}")
        args = dict(data)
        tasks = args["tasks"]
        args["tasks"] = [tasks] if isinstance(tasks, str) else list(tasks)
        if root is not None:
            def fix(p: str) -> str:
                q = Path(p).expanduser()
                return str(q if q.is_absolute() else (root / q).resolve())
            args["tasks"] = [fix(t) for t in args["tasks"]]
            if args.get("probe"):
                args["probe"] = fix(args["probe"])
            for key in ("base", "reasoning"):
                cand = root / str(args[key])
                if not Path(str(args[key])).is_absolute() and cand.exists():
                    args[key] = str(cand.resolve())
        return cls(**args)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchConfig":
        import yaml  # here, so that `search run --help` stays quick
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise MergePipeError(f"cannot read search config {p}: {exc}")
        return cls.from_dict(data, root=p.resolve().parent)

    def probe_path(self) -> Path:
        """The training split beside the first task unless the config names one."""
        if self.probe:
            return Path(self.probe)
        first = Path(self.tasks[0])
        cand = first.with_name("train.jsonl")
        if not cand.exists():
            raise MergePipeError(f"no training split for probe prompts: set `probe:` in the "
                                 f"config (looked for {cand})")
        return cand


KEY_HELP: dict[str, str] = {
    "base": "the base model: a registered name or a checkpoint directory",
    "reasoning": "the reasoning model, same forms",
    "tasks": "JSONL files of {prompt, answer}; the objectives are accuracy and mean "
             "generated tokens over them",
    "algorithm": "how candidates are proposed: " + " | ".join(ALGORITHMS),
    "n_init": "trials from the shared Sobol design before the algorithm proposes",
    "n_total": "trials in all",
    "workers": "candidates merged and evaluated at once",
    "seed": "seeds the Sobol design and the proposals",
    "limit": "problems per task",
    "group_size": "contiguous layers that share one coefficient",
    "io_budget": "expert-byte budget of each merge plan (10%, 2GiB)",
    "device": "where candidates are merged and evaluated (cpu, cuda, cuda:1)",
    "probe": "training JSONL for the activation prior",
    "probe_n": "probe prompts for the activation prior",
    "max_new_tokens": "generation cap per problem",
    "stretch_alpha": "emulate heavy-tailed evaluation times with this Pareto alpha",
    "out_dir": "candidate checkpoints go to OUT_DIR/<search id>",
    "keep_all": "keep every candidate checkpoint, not only the Pareto front",
    "evaluator": "checkpoint: write each candidate, then load it | "
                 "resident: merge in memory into a live engine per worker",
    "backend": "the evaluation engine: " + " | ".join(BACKENDS),
    "pool": "local: worker processes | ray: Ray actors",
    "ray_address": "an existing Ray cluster, HEAD:6379",
}
# what an unset (None) key means
UNSET_MEANS: dict[str, str] = {
    "limit": "the whole file", "io_budget": "read everything",
    "probe": "train.jsonl beside the first task",
    "max_new_tokens": str(DEFAULT_MAX_NEW_TOKENS), "stretch_alpha": "off",
    "out_dir": "<workspace>/searches", "ray_address": "start a local Ray",
}


def config_keys() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every search config key, in the dataclass's order;
    the default is written as YAML would, or says what leaving the key out means."""
    out = []
    for f in fields(SearchConfig):
        if f.default is MISSING:
            default = "required"
        else:
            default = UNSET_MEANS[f.name] if f.default is None else str(f.default).lower()
        out.append((f.name, default, KEY_HELP[f.name]))
    return out

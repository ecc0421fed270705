"""The search config (YAML), validated once so every later failure is about the search."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mergepipe.errors import MergePipeError
from mergepipe.evaluate.runner import BACKENDS
from mergepipe.search.algorithms import ALGORITHMS

EVALUATORS = ("checkpoint", "resident")
POOLS = ("local", "ray")


@dataclass
class SearchConfig:
    base: str
    reasoning: str
    tasks: list[str]
    algorithm: str = "apbmm"
    n_init: int = 8
    n_total: int = 40
    workers: int = 4
    seed: int = 0
    limit: int | None = None          # problems per task (None: the whole file)
    group_size: int = 1               # contiguous layers per coefficient
    io_budget: Any = None             # expert-byte budget passed to the planner
    device: str = "cpu"
    probe: str | None = None          # training JSONL for the activation prior
    probe_n: int = 32
    max_new_tokens: int | None = None
    stretch_alpha: float | None = None  # heavy-tailed evaluation-time emulation (Pareto α)
    out_dir: str | None = None
    keep_all: bool = False
    evaluator: str = "checkpoint"     # checkpoint: write, then load | resident: merge in memory
    backend: str = "transformers"     # the evaluation engine (transformers | vllm)
    pool: str = "local"               # local worker processes | ray actors
    ray_address: str | None = None    # an existing Ray cluster (default: start a local one)

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

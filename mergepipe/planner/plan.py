"""The Plan: a plain, hashable description of a merge that the engine executes.

It is self-contained (absolute paths, byte ranges, resolved per-tensor
parameters), so it can be pickled to a worker process that has no catalog.
Its id is the sha256 of its canonical JSON: the same spec over the same files
gives the same id, which is how a re-apply finds an existing commit.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import zstandard

from mergepipe.safetensors_format import itemsize, row_split

PLAN_FORMAT = 1


@dataclass(frozen=True)
class Source:
    """One input model as the plan saw it."""

    key: str                # stable id used for RNG seeding and display (model name)
    model_id: str
    path: str
    fingerprint: str
    role: str               # base | expert


@dataclass
class Read:
    """A tensor of one source: where its bytes lie and which rows to read."""

    src: int                              # index into Plan.sources
    file: str                             # relpath inside the source model
    offset: int                           # absolute byte offset of the tensor
    nbytes: int
    dtype: str
    rows: list[tuple[int, int]] | None = None   # None: all rows; else selected [a, b) ranges
    alias_base: bool = False              # byte-identical to the base: reuse, don't read
    content_hash: str | None = None       # registered hash; the engine checks it

    def bytes_to_read(self, row_bytes: int) -> int:
        if self.alias_base:
            return 0
        if self.rows is None:
            return self.nbytes
        return sum(b - a for a, b in self.rows) * row_bytes


@dataclass
class TensorTask:
    """One output tensor: its inputs, resolved parameters and output layout."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    layer: int | None
    scope: str                             # block | tensor
    params: dict[str, Any]                 # per-model params are lists aligned with inputs
    base: Read | None
    inputs: list[Read]                     # the non-base inputs, in spec order
    input_keys: list[str]
    skipped: list[str] = field(default_factory=list)   # inputs dropped (zero weight)
    shard: int = 0

    @property
    def rows(self) -> int:
        return row_split(self.shape, 0)[0]

    def row_bytes(self, read: Read) -> int:
        """Bytes per row of one of this tensor's inputs (inputs may differ in dtype)."""
        return row_split(self.shape, read.nbytes)[1]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Plan:
    method: str
    seed: int
    sources: list[Source]
    tasks: list[TensorTask]
    shards: list[str]                      # output file names, task.shard indexes them
    copy_files: list[str]                  # side files copied from the base/first model
    spec: dict[str, Any]
    io_budget: int | None = None
    error_bound: float | None = None
    error_bound_kind: str | None = None
    format: int = PLAN_FORMAT
    plan_id: str = ""
    # keys to change in the copied config.json (e.g. num_hidden_layers of a frankenmerge)
    config_updates: dict[str, Any] = field(default_factory=dict)

    # -- identity -------------------------------------------------------
    def canonical(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("plan_id")
        if not doc["config_updates"]:  # plans that change no config keep their old ids
            doc.pop("config_updates")
        for t in doc["tasks"]:  # and plans made before reads carried hashes keep theirs
            for r in [t["base"], *t["inputs"]]:
                if r is not None and r.get("content_hash") is None:
                    r.pop("content_hash", None)
        return doc

    def canonical_json(self) -> str:
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    def finalize(self) -> "Plan":
        self.plan_id = hashlib.sha256(self.canonical_json().encode()).hexdigest()
        return self

    # -- storage --------------------------------------------------------
    def to_blob(self) -> bytes:
        return zstandard.ZstdCompressor(level=6).compress(self.canonical_json().encode())

    @classmethod
    def from_blob(cls, blob: bytes) -> "Plan":
        doc = json.loads(zstandard.ZstdDecompressor().decompress(blob))
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Plan":
        def read(d: dict[str, Any] | None) -> Read | None:
            if d is None:
                return None
            rows = [tuple(r) for r in d["rows"]] if d.get("rows") is not None else None
            return Read(**{**d, "rows": rows})
        tasks = []
        for t in doc["tasks"]:
            tasks.append(TensorTask(**{**t, "shape": tuple(t["shape"]), "base": read(t["base"]),
                                       "inputs": [read(r) for r in t["inputs"]]}))
        plan = cls(**{**doc, "sources": [Source(**s) for s in doc["sources"]], "tasks": tasks})
        return plan.finalize()

    # -- summaries ------------------------------------------------------
    def base_source(self) -> int | None:
        for i, s in enumerate(self.sources):
            if s.role == "base":
                return i
        return None

    def bytes_by_source(self) -> dict[int, int]:
        out = {i: 0 for i in range(len(self.sources))}
        for t in self.tasks:
            for r in ([t.base] if t.base else []) + t.inputs:
                out[r.src] += r.bytes_to_read(t.row_bytes(r))
        return out

    def est_bytes(self) -> dict[str, int]:
        """Bytes the engine will read from the base and from the experts, and write."""
        by_src = self.bytes_by_source()
        b = self.base_source()
        base = by_src.get(b, 0) if b is not None else 0
        experts = sum(v for i, v in by_src.items() if i != b)
        out = sum(t.numel * itemsize(t.out_dtype) for t in self.tasks)
        return {"base": base, "experts": experts, "out": out}

    def full_expert_bytes(self) -> int:
        """Expert bytes an exact plan would read (the 100% of a budget)."""
        b = self.base_source()
        total = 0
        for t in self.tasks:
            for r in t.inputs:
                if r.src != b and not r.alias_base:
                    total += r.nbytes
        return total

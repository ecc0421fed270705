"""Plans for specs with ``slices``: layer ranges of models stacked into a new model.

Each output slice takes the same number of layers from each of its sources
and merges them layer by layer with the spec's method; slices are stacked, and
output layers are renumbered from 0. As in mergekit: gradients run over each
slice separately (layer i of n has t = i/(n−1)), embeddings come from the
first slice's models and the final norm and head from the last slice's (both
at t = 0), a model's own parameters beat its slice's, which beat the spec's.
Passthrough with one source per slice is the classic frankenmerge.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergepipe.catalog.names import LAYER_PATTERN
from mergepipe.catalog.register import check_fresh
from mergepipe.catalog.store import Catalog
from mergepipe.errors import MergePipeError, SpecError
from mergepipe.planner.resolve import resolve_model
from mergepipe.planner.tasks import (InputRef, assign_shards, check_settings, input_tensor,
                                     make_task, out_dtype_code, side_files, split_base,
                                     tensor_map)
from mergepipe.planner.params import gradient_t
from mergepipe.planner.plan import Plan, Source, TensorTask
from mergepipe.planner.spec import MergeSpec, SliceSource, SliceSpec

PRE_MODULES = ("embed_tokens", "embed_positions")   # planned with the first slice
LAYER_KEYS = ("num_hidden_layers", "n_layer")


def rename_layer(name: str, layer: int) -> str:
    """``model.layers.7.mlp.up_proj.weight`` → the same tensor in layer ``layer``."""
    m = LAYER_PATTERN.search(name)
    if m is None:
        raise MergePipeError(f"tensor {name!r} has no layer index")
    a, b = m.span("idx")
    return f"{name[:a]}{layer}{name[b:]}"


class _Slice:
    """One output slice with its models resolved and the method's base policy applied."""

    def __init__(self, cat: Catalog, spec: MergeSpec, index: int, sl: SliceSpec):
        self.spec, self.params = sl, sl.params
        where = f"slices[{index}]"
        method = spec.method
        ref = sl.base or spec.base
        base = resolve_model(cat, ref) if ref else None
        rows = [(resolve_model(cat, s.ref), s) for s in sl.sources]
        by_id = {row["model_id"]: s for row, s in rows}
        if method.base != "none" and base is not None and base["model_id"] not in by_id:
            raise SpecError(f"{where}: base model {base['name']!r} is not among the slice's "
                            f"sources; {method.name!r} reads the base's layers from the slice")
        base, entries = split_base(method, base, [(row, s.params) for row, s in rows], where,
                                   add_missing_base=False)
        self.base = base
        self.base_source: SliceSource | None = by_id[base["model_id"]] if base else None
        self.inputs = [(row, by_id[row["model_id"]]) for row, _ in entries]
        self.layout_row, self.layout_source = (base, self.base_source) if base else self.inputs[0]
        for row in self.models():
            check_fresh(cat, row)
            n = row["num_layers"]
            src = by_id[row["model_id"]]
            if n is not None and src.layer_range[1] > n:
                raise SpecError(f"{where}: layer_range {list(src.layer_range)} is outside "
                                f"{row['name']!r}, which has {n} layers")

    def models(self) -> list[dict[str, Any]]:
        return ([self.base] if self.base else []) + [row for row, _ in self.inputs]


class SlicePlanner:
    """Builds the tasks of a sliced spec against the catalog's tensor index."""

    def __init__(self, cat: Catalog, spec: MergeSpec):
        assert spec.slices is not None
        self.cat, self.spec, self.method = cat, spec, spec.method
        self.slices = [_Slice(cat, spec, i, sl) for i, sl in enumerate(spec.slices)]
        self.num_layers = sum(sl.spec.num_layers for sl in self.slices)
        check_settings([spec.parameters] + [s.params for s in spec.slices] +
                       [src.params for s in spec.slices for src in s.sources], self.num_layers)
        self.config_model = resolve_model(cat, spec.base) if spec.base else \
            self.slices[0].layout_row
        self.sources = self._sources()
        self.src_of = {s.model_id: i for i, s in enumerate(self.sources)}
        self._maps: dict[str, dict[str, dict[str, Any]]] = {}
        self.out_code = out_dtype_code(spec)

    def _sources(self) -> list[Source]:
        bases = {sl.base["model_id"] for sl in self.slices if sl.base}
        rows = [self.config_model] + [row for sl in self.slices for row in sl.models()]
        out: list[Source] = []
        for row in rows:
            if row["model_id"] not in {s.model_id for s in out}:
                role = "base" if row["model_id"] in bases else "expert"
                out.append(Source(row["name"], row["model_id"], row["path"], row["fingerprint"],
                                  role))
        return out

    def tensors(self, model_id: str) -> dict[str, dict[str, Any]]:
        if model_id not in self._maps:
            self._maps[model_id] = tensor_map(self.cat, model_id)
        return self._maps[model_id]

    def _task(self, sl: _Slice, out_name: str, layout: dict[str, Any], layer: int | None,
              t: float, name_in: Any) -> TensorTask:
        """``name_in(source)`` is the input tensor name in that source's model."""
        layout_name = sl.layout_row["name"]
        base = None
        if sl.base is not None:
            base = (self.src_of[sl.base["model_id"]], layout)
        inputs = []
        for row, src in sl.inputs:
            tensor = input_tensor(self.tensors(row["model_id"]), name_in(src), row["name"],
                                  layout, layout_name)
            inputs.append(InputRef(self.src_of[row["model_id"]], row["name"], tensor,
                                   [src.params, sl.params, self.spec.parameters]))
        return make_task(self.method, out_name, layer, t, layout, base, inputs,
                         [sl.params, self.spec.parameters], self.out_code)

    def _outside_layers(self, sl: _Slice, pre: bool) -> list[TensorTask]:
        layout = self.tensors(sl.layout_row["model_id"])
        rows = [r for r in layout.values()
                if r["layer"] is None and (r["module"] in PRE_MODULES) == pre]
        return [self._task(sl, r["name"], r, None, 0.0, lambda src, n=r["name"]: n)
                for r in sorted(rows, key=lambda r: (r["file"], r["byte_offset"]))]

    def _layers(self, sl: _Slice, first_out: int) -> list[TensorTask]:
        tasks = []
        layout = self.tensors(sl.layout_row["model_id"])
        n = sl.spec.num_layers
        for idx in range(n):
            in_layer = sl.layout_source.layer_range[0] + idx
            rows = sorted((r for r in layout.values() if r["layer"] == in_layer),
                          key=lambda r: (r["file"], r["byte_offset"]))
            if not rows:
                raise SpecError(f"model {sl.layout_row['name']!r} has no layer {in_layer}")
            for r in rows:
                tasks.append(self._task(
                    sl, rename_layer(r["name"], first_out + idx), r, first_out + idx,
                    gradient_t(idx, n),
                    lambda src, name=r["name"], i=idx: rename_layer(name, src.layer_range[0] + i)))
        return tasks

    def plan(self) -> Plan:
        tasks = self._outside_layers(self.slices[0], pre=True)
        out_layer = 0
        for sl in self.slices:
            tasks += self._layers(sl, out_layer)
            out_layer += sl.spec.num_layers
        tasks += self._outside_layers(self.slices[-1], pre=False)
        shards = assign_shards(tasks, self.spec.out_shard_size)
        plan = Plan(method=self.method.name, seed=self.spec.seed, sources=self.sources,
                    tasks=tasks, shards=shards,
                    copy_files=side_files(self.cat, self.config_model["model_id"]),
                    spec=self.spec.raw, config_updates=self._config_updates())
        return plan.finalize()

    def _config_updates(self) -> dict[str, Any]:
        """The merged layer count; per-layer config lists follow their layers."""
        path = Path(self.config_model["path"]) / "config.json"
        cfg = json.loads(path.read_text()) if path.exists() else {}
        updates: dict[str, Any] = {k: self.num_layers for k in LAYER_KEYS if k in cfg}
        if not updates:
            updates["num_hidden_layers"] = self.num_layers
        if isinstance(cfg.get("layer_types"), list):
            types = []
            for sl in self.slices:
                a, b = sl.layout_source.layer_range
                types += cfg["layer_types"][a:b]
            if len(types) == self.num_layers:
                updates["layer_types"] = types
        return updates


def build_slice_plan(cat: Catalog, spec: MergeSpec) -> Plan:
    """An exact plan for a sliced spec (frankenmerges, per-slice merges)."""
    return SlicePlanner(cat, spec).plan()

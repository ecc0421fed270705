"""The safetensors container format: header parsing with validation, and layout.

Both the catalog (indexing from headers alone) and the engine (positional reads,
header-first streaming writes) need the byte layout, so it lives here, once.
File layout: 8-byte little-endian header length N, N bytes of JSON, then data;
``data_offsets`` are relative to the data start and tile it without holes.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergepipe.errors import BadCheckpointError

if TYPE_CHECKING:
    import torch

# code -> (torch dtype name, bytes per element); order = the official writer's dtype order
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
}
_DTYPE_RANK = {code: i for i, code in enumerate(DTYPES)}
FLOAT_CODES = {"F16", "BF16", "F32", "F64"}
# what a spec or config may call a float dtype: torch names and their short forms
NAME_TO_CODE = {**{DTYPES[c][0]: c for c in FLOAT_CODES},
                "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in a file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int          # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return row_split(self.shape, self.nbytes)[0]

    @property
    def row_bytes(self) -> int:
        return row_split(self.shape, self.nbytes)[1]


def row_split(shape: tuple[int, ...] | list[int], nbytes: int) -> tuple[int, int]:
    """(rows, bytes per row) of a tensor: blocks are contiguous ranges of leading rows,
    so a block of rows is one contiguous byte range (a scalar is one row)."""
    rows = shape[0] if len(shape) else 1
    return rows, (nbytes // rows if rows else 0)


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int
    data_start: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def itemsize(code: str) -> int:
    return DTYPES[code][1]


def torch_dtype(code: str) -> "torch.dtype":
    """The torch dtype of a code (torch is imported here, not at module load)."""
    import torch
    return getattr(torch, DTYPES[code][0])


def dtype_name(code: str) -> str:
    """'BF16' → 'bfloat16', as config.json's torch_dtype spells it."""
    return DTYPES[code][0]


def dtype_code(name: str) -> str:
    """Accept 'bfloat16', 'bf16', 'BF16', torch.bfloat16 → 'BF16'."""
    key = str(name).replace("torch.", "")
    if key.upper() in DTYPES:
        return key.upper()
    if key.lower() in NAME_TO_CODE:
        return NAME_TO_CODE[key.lower()]
    raise ValueError(f"unknown dtype {name!r}")


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header without reading tensor data."""
    path = Path(path)
    size = path.stat().st_size
    where = str(path)
    if size < 8:
        raise BadCheckpointError(f"{where}: truncated safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER:
            raise BadCheckpointError(
                f"{where}: header length {n} is larger than the file ({size} bytes)")
        raw = f.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadCheckpointError(f"{where}: header is not valid JSON ({exc.__class__.__name__})")
    if not isinstance(doc, dict):
        raise BadCheckpointError(f"{where}: header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BadCheckpointError(f"{where}: __metadata__ is not a mapping of strings")
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in doc.items():
        try:
            code = info["dtype"]
            shape = tuple(_count(s) for s in info["shape"])
            begin, end = (_count(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BadCheckpointError(f"{where}: malformed header entry for tensor {name!r}")
        if not isinstance(code, str) or code not in DTYPES:
            raise BadCheckpointError(f"{where}: tensor {name!r} has unknown dtype {code!r}")
        expect = math.prod(shape) * itemsize(code)
        if end - begin != expect or begin < 0:
            raise BadCheckpointError(
                f"{where}: tensor {name!r} offsets [{begin}, {end}) do not match "
                f"its shape {list(shape)} and dtype {code}")
        if end > data_len:
            raise BadCheckpointError(
                f"{where}: tensor {name!r} offsets [{begin}, {end}) are out of range: "
                f"the file holds {data_len} data bytes (truncated?)")
        entries[name] = TensorEntry(name, code, shape, data_start + begin, expect)
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise BadCheckpointError(
                f"{where}: tensor {name!r} starts at {begin}, expected {pos} "
                f"(overlapping or holed data)")
        pos = end
    if pos != data_len:
        raise BadCheckpointError(
            f"{where}: data section is {data_len} bytes but tensors cover {pos}")
    return Header(path, n, data_start, size, entries, {str(k): str(v) for k, v in meta.items()})


def _count(v: object) -> int:
    """A dimension or offset: a non-negative JSON integer (not 1.5, "3" or true)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(v)
    return v


def official_order(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Order (name, dtype) pairs as the official writer does: dtype descending, then name."""
    return sorted(items, key=lambda it: (-_DTYPE_RANK[it[1]], it[0]))


def layout(specs: list[tuple[str, str, tuple[int, ...]]],
           metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Build the header bytes for tensors written in the given order.

    Returns the full prefix (length + padded JSON) and each tensor's
    [begin, end) relative to the data start.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, code, shape in specs:
        nbytes = math.prod(shape) * itemsize(code)
        offsets[name] = (pos, pos + nbytes)
        doc[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets

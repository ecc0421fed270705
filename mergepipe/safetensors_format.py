"""The safetensors container format: header parsing with validation, and layout.

Both the catalog (indexing from headers alone) and the engine (positional reads,
header-first streaming writes) need the byte layout, so it lives here, once.
File layout: 8-byte little-endian header length N, N bytes of JSON, then data;
``data_offsets`` are relative to the data start and tile it without holes.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mergepipe.errors import BadCheckpointError

# code -> (torch dtype, bytes per element); order = the official writer's dtype order
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
}
_DTYPE_RANK = {code: i for i, code in enumerate(DTYPES)}
TORCH_TO_CODE = {v[0]: k for k, v in DTYPES.items()}
NAME_TO_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
FLOAT_CODES = {"F16", "BF16", "F32", "F64"}
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
        """Leading dimension: a block is a contiguous range of rows."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


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


def torch_dtype(code: str) -> torch.dtype:
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


def fsync_dir(path: str | Path) -> None:
    """Make a rename or file creation in a directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

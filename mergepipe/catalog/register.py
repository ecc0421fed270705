"""Index a Hugging Face safetensors directory into the catalog, from headers.

Weights are never copied: the catalog records where every tensor's bytes lie
(shard, offset, length) plus a content hash, so the planner can schedule exact
positional reads and skip expert tensors that are byte-identical to the base.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from tqdm import tqdm

from mergepipe.catalog import schema
from mergepipe.catalog.names import parse_tensor_name
from mergepipe.catalog.store import Catalog, dumps, new_id, now
from mergepipe.errors import BadCheckpointError, MergePipeError, StaleModelError
from mergepipe.files import safe_relpath
from mergepipe.hashing import BLAKE3, tensor_hasher
from mergepipe.safetensors_format import Header, read_header

INDEX_FILE = "model.safetensors.index.json"
SIDE_FILES = {
    "config.json": "config",
    "generation_config.json": "generation",
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer",
    "tokenizer.model": "tokenizer",
    "special_tokens_map.json": "tokenizer",
    "added_tokens.json": "tokenizer",
    "vocab.json": "tokenizer",
    "merges.txt": "tokenizer",
    "chat_template.jinja": "tokenizer",
    "chat_template.json": "tokenizer",
}
HASH_CHUNK = 8 << 20


@dataclass
class ScannedModel:
    """What a model directory holds, before it touches the catalog."""

    path: Path
    headers: dict[str, Header]              # relpath -> header
    side_files: dict[str, str]              # relpath -> role
    config: dict[str, Any] | None


def weight_files(path: Path) -> list[str]:
    """The shard files of a checkpoint, from its index when it has one."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BadCheckpointError(f"{index}: not a valid safetensors index")
        for rel in files:
            if not safe_relpath(rel):
                raise BadCheckpointError(f"{index}: shard {rel!r} lies outside the model "
                                         f"folder")
        return files
    if (path / "model.safetensors").exists():
        return ["model.safetensors"]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if not found:
        raise BadCheckpointError(f"{path}: no safetensors weights found "
                                 f"(expected model.safetensors or {INDEX_FILE})")
    return found


def scan(path: str | Path) -> ScannedModel:
    """Read and validate every header of a model directory."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise MergePipeError(f"{path}: not a model directory")
    headers: dict[str, Header] = {}
    seen: dict[str, str] = {}
    for rel in weight_files(path):
        if not (path / rel).exists():
            raise BadCheckpointError(f"{path}: shard {rel} named in the index is missing")
        header = read_header(path / rel)
        for name in header.tensors:
            if name in seen:
                raise BadCheckpointError(f"{path}: tensor {name!r} appears in both "
                                         f"{seen[name]} and {rel}")
            seen[name] = rel
        headers[rel] = header
    if not seen:
        raise BadCheckpointError(f"{path}: the safetensors files hold no tensors")
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, rel in weight_map.items():
            if seen.get(name) != rel:
                raise BadCheckpointError(f"{index}: tensor {name!r} is mapped to {rel} "
                                         f"but is not in that shard")
    side = {rel: role for rel, role in SIDE_FILES.items() if (path / rel).exists()}
    if index.exists():
        side[INDEX_FILE] = "index"
    config = None
    if (path / "config.json").exists():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError:
            raise BadCheckpointError(f"{path / 'config.json'}: not valid JSON")
    return ScannedModel(path, headers, side, config)


def fingerprint_files(path: Path, relpaths: list[str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """Cheap identity of a model's files: (name, size, mtime_ns) of each."""
    stats: dict[str, tuple[int, int]] = {}
    for rel in sorted(relpaths):
        st = (path / rel).stat()
        stats[rel] = (st.st_size, st.st_mtime_ns)
    digest = hashlib.sha256(dumps(stats).encode()).hexdigest()[:32]
    return digest, stats


def hash_tensors(scanned: ScannedModel, progress: bool = False,
                 kind: str = BLAKE3) -> dict[str, str]:
    """Each tensor's content hash (:mod:`mergepipe.hashing`), reading each shard sequentially once."""
    out: dict[str, str] = {}
    total = sum(h.file_size for h in scanned.headers.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"hash {scanned.path.name}",
               disable=not progress, leave=False)
    for rel, header in scanned.headers.items():
        with open(scanned.path / rel, "rb", buffering=0) as f:
            for entry in sorted(header.tensors.values(), key=lambda e: e.offset):
                h = tensor_hasher(kind)
                pos, end = entry.offset, entry.offset + entry.nbytes
                while pos < end:
                    chunk = os.pread(f.fileno(), min(HASH_CHUNK, end - pos), pos)
                    if not chunk:
                        raise BadCheckpointError(f"{scanned.path / rel}: truncated while "
                                                 f"reading tensor {entry.name!r}")
                    h.update(chunk)
                    pos += len(chunk)
                    bar.update(len(chunk))
                out[entry.name] = h.hexdigest()
    bar.close()
    return out


def default_names(path: Path, repo_id: str | None = None,
                  revision: str | None = None) -> Iterator[str]:
    """Names a model may get when none is asked for, plainest first.

    A folder: its name, then with its parent folders joined by '-' (``b-base``
    for /data/b/base). A hub model: the repo's name, then ``org-name-<commit>``
    (another revision of the same repo is the usual holder). Numbered names come
    last, so the list never runs out."""
    if repo_id:
        org, repo = repo_id.split("/", 1)
        stem = f"{org}-{repo}"
        yield from [repo] + ([f"{stem}-{revision[:8]}"] if revision else [stem])
    else:
        parts = [part for part in path.parts if part.strip("/")]
        stem = path.name
        yield from ("-".join(parts[i:]) for i in range(len(parts) - 1, -1, -1))
    for n in itertools.count(2):
        yield f"{stem}-{n}"


def describe(model: dict[str, Any]) -> str:
    """A model as a person knows it: its hub id and revision, else its folder."""
    if model.get("repo_id"):
        return f"{model['repo_id']}@{(model.get('revision') or '')[:12]}"
    return str(model["path"])


def register_model(cat: Catalog, path: str | Path, name: str | None = None,
                   progress: bool = False, kind: str = "source",
                   precomputed_hashes: dict[str, str] | None = None,
                   repo_id: str | None = None, revision: str | None = None,
                   notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Index a model directory; a no-op when it is already registered unchanged.

    An explicit ``name`` must be free (or already this folder's). Without one a
    folder keeps the name it has, or gets the first free one of
    :func:`default_names`; when that is not the plainest, ``notify`` hears why.
    ``repo_id`` and ``revision`` (the commit sha) record a hub snapshot's origin.
    ``precomputed_hashes`` lets the engine register its own output without
    reading it back (it hashed every tensor while writing).
    """
    scanned = scan(path)
    p = scanned.path
    weights = list(scanned.headers)
    fp, stats = fingerprint_files(p, weights + list(scanned.side_files))
    if name is not None and (not name.strip() or name != name.strip() or "\n" in name):
        raise MergePipeError(f"model name {name!r} is empty or starts or ends with blanks; "
                             f"give a visible name")
    existing = cat.model_by_path(p)
    renamed_from: tuple[str, dict[str, Any]] | None = None
    if name is None and existing:
        name = existing["name"]
    elif name is None:
        name, renamed_from = _free_name(cat, default_names(p, repo_id, revision))
    else:
        holder = cat.model_by_name(name)
        if holder is not None and holder["path"] != str(p):
            raise MergePipeError(f"model name {name!r} is already used for "
                                 f"{describe(holder)}; pass --name to choose another")
    origin = (dict(repo_id=repo_id, revision=revision) if repo_id else
              dict(repo_id=existing.get("repo_id"), revision=existing.get("revision"))
              if existing else dict(repo_id=None, revision=None))
    if existing and existing["fingerprint"] == fp:
        changes = {k: v for k, v in dict(name=name, **origin).items() if existing.get(k) != v}
        if changes:
            cat.execute(schema.models.update().where(
                schema.models.c.model_id == existing["model_id"]).values(**changes))
            existing.update(changes)
        return existing
    all_names = {n for h in scanned.headers.values() for n in h.tensors}
    if precomputed_hashes is not None and set(precomputed_hashes) == all_names:
        hashes = precomputed_hashes
    else:
        hashes = hash_tensors(scanned, progress=progress)
    model_id = existing["model_id"] if existing else new_id()
    tensor_rows = []
    num_params = 0
    max_layer = -1
    for rel, header in scanned.headers.items():
        for entry in header.tensors.values():
            layer, module = parse_tensor_name(entry.name)
            max_layer = max(max_layer, layer if layer is not None else -1)
            num_params += entry.numel
            tensor_rows.append(dict(
                model_id=model_id, name=entry.name, layer=layer, module=module, file=rel,
                byte_offset=entry.offset, byte_length=entry.nbytes, dtype=entry.dtype,
                shape=json.dumps(list(entry.shape)), content_hash=hashes[entry.name]))
    cfg = scanned.config or {}
    num_layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or (max_layer + 1 or None)
    archs = cfg.get("architectures") or [None]
    row = dict(model_id=model_id, name=name, path=str(p), kind=kind, **origin,
               architecture=archs[0], num_layers=num_layers, num_params=num_params,
               total_bytes=sum(h.file_size for h in scanned.headers.values()),
               fingerprint=fp, config_json=json.dumps(cfg) if cfg else None,
               created_at=now())
    file_rows = [dict(model_id=model_id, relpath=rel,
                      role="weights" if rel in scanned.headers else scanned.side_files[rel],
                      size=stats[rel][0], mtime_ns=stats[rel][1],
                      header_len=scanned.headers[rel].header_len if rel in scanned.headers else None)
                 for rel in stats]
    with cat.transaction() as c:
        if existing:
            for t in (schema.tensors, schema.files):
                c.execute(t.delete().where(t.c.model_id == model_id))
            c.execute(schema.models.delete().where(schema.models.c.model_id == model_id))
            for col in ("expert_model_id", "base_model_id"):  # stats are stale now
                c.execute(schema.block_stats.delete().where(schema.block_stats.c[col] == model_id))
                c.execute(schema.stats_runs.delete().where(schema.stats_runs.c[col] == model_id))
        c.execute(schema.models.insert().values(**row))
        c.execute(schema.files.insert(), file_rows)
        c.execute(schema.tensors.insert(), tensor_rows)
    if renamed_from and notify:
        taken, holder = renamed_from
        what = f"{repo_id}@{(revision or '')[:12]}" if repo_id else str(p)
        notify(f"registered {what} as {name!r} (name {taken!r} is taken by {describe(holder)})")
    return row


def _free_name(cat: Catalog, candidates: Iterator[str]
               ) -> tuple[str, tuple[str, dict[str, Any]] | None]:
    """The first candidate no model holds, and the plainest one's holder if it was taken."""
    taken: tuple[str, dict[str, Any]] | None = None
    for candidate in candidates:
        holder = cat.model_by_name(candidate)
        if holder is None:
            return candidate, taken
        taken = taken or (candidate, holder)
    raise AssertionError("default_names never runs out")


def check_fresh(cat: Catalog, model: dict[str, Any]) -> None:
    """Refuse to use a model whose files changed since it was registered."""
    t = schema.files
    rows = cat.rows(sa.select(t).where(t.c.model_id == model["model_id"]))
    base = Path(model["path"])
    for r in rows:
        f = base / r["relpath"]
        try:
            st = f.stat()
        except FileNotFoundError:
            raise StaleModelError(f"model {model['name']!r}: file {f} is gone since it was "
                                  f"registered; run `mergepipe register {base}` again")
        if (st.st_size, st.st_mtime_ns) != (r["size"], r["mtime_ns"]):
            raise StaleModelError(f"model {model['name']!r}: file {f} changed since it was "
                                  f"registered; run `mergepipe register {base}` again")

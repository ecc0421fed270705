"""Hugging Face Hub ids as model references: ``org/name`` or ``org/name@revision``.

A hub model is a snapshot folder of the local Hugging Face cache, the one
transformers shares, found or downloaded through ``huggingface_hub``. Its
commit sha pins the revision, so a plan names the exact weights it read.
``huggingface_hub`` is imported only when a hub id is resolved, so catalog
commands stay quick.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergepipe.errors import MergePipeError

# org/name as the Hub spells it (one slash), then an optional @revision
# (a branch, tag or commit; branches such as refs/pr/1 may hold slashes)
_HUB_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})"
                      r"(?:@(?P<rev>[^\s@]+))?")
_TRUE = {"1", "ON", "YES", "TRUE"}
# what a merge reads: weights, their index, configs and tokenizer files (not .bin/.gguf copies)
FILE_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
SKIP_PATTERNS = ["consolidated*", "original/*"]  # second copies of the weights in other layouts


class HubModelError(MergePipeError):
    """A hub id that cannot be found in the cache or downloaded."""


@dataclass(frozen=True)
class HubRef:
    """A hub id as written: the repo and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def wanted(self) -> str:
        return self.revision or "main"


@dataclass(frozen=True)
class HubSnapshot:
    """A revision on disk: its snapshot folder and the commit sha it holds."""

    path: Path
    repo_id: str
    revision: str


def parse_hub_ref(ref: str) -> HubRef | None:
    """``org/name[@revision]`` when ``ref`` is shaped like a hub id, else None.

    Callers check for a local folder first: an existing directory always wins."""
    m = _HUB_REF.fullmatch(ref.strip())
    if m is None:
        return None
    repo = m.group("repo")
    if "--" in repo or ".." in repo or repo.endswith(".git"):
        return None  # the Hub refuses these names
    return HubRef(repo, m.group("rev"))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps models, read from the environment at each call
    (the library's own constants are frozen when it is first imported)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: use the cache only, never the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def cached_revisions(ref: HubRef, cache: Path) -> list[str]:
    """The branches and tags the cache knows for a repo, for error messages."""
    refs = cache / f"models--{ref.repo_id.replace('/', '--')}" / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) \
        if refs.is_dir() else []


def fetch_snapshot(ref: HubRef) -> HubSnapshot:
    """The cached snapshot of ``ref``, downloaded first when online and missing
    (with huggingface_hub's own progress bars).

    Every failure is one :class:`HubModelError` line naming the id and revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import utils as hub_utils

    cache, offline = hub_cache_dir(), hub_offline()
    where = f"{ref.repo_id!r} (revision {ref.wanted!r})"
    incomplete = getattr(hub_utils, "IncompleteSnapshotError", ())
    try:
        folder = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache,
                                   local_files_only=offline, allow_patterns=FILE_PATTERNS,
                                   ignore_patterns=SKIP_PATTERNS)
    except incomplete:
        raise HubModelError(f"hub model {where}: the cached snapshot in {cache} is incomplete; "
                            f"download it again with network access") from None
    except hub_utils.LocalEntryNotFoundError:
        known = cached_revisions(ref, cache)
        what = (f"hub model {ref.repo_id!r} has no revision {ref.wanted!r} in the Hugging Face "
                f"cache {cache} (cached: {', '.join(known)})" if known else
                f"hub model {where} is not in the Hugging Face cache {cache}")
        why = ("and HF_HUB_OFFLINE=1 forbids downloading it" if offline else
               "and the Hub could not be reached to download it")
        if ref.revision and re.fullmatch(r"[0-9a-f]{4,39}", ref.revision):
            why += " (a commit is named by all 40 hex digits)"
        raise HubModelError(f"{what}, {why}") from None
    except hub_utils.GatedRepoError:
        raise HubModelError(f"hub model {where} is gated: accept its terms on the Hub and log "
                            f"in (`hf auth login`)") from None
    except hub_utils.RevisionNotFoundError:
        raise HubModelError(f"hub model {ref.repo_id!r} has no revision {ref.wanted!r} on the "
                            f"Hugging Face Hub") from None
    except hub_utils.RepositoryNotFoundError:
        raise HubModelError(f"hub model {where} is not on the Hugging Face Hub (a private one "
                            f"needs `hf auth login`), and there is no local folder of that name") \
            from None
    except hub_utils.HFValidationError as exc:
        raise HubModelError(f"{str(ref)!r} is not a valid hub id: {_first_line(exc)}") from None
    except (hub_utils.HfHubHTTPError, OSError) as exc:
        raise HubModelError(f"cannot download hub model {where}: {_first_line(exc)}") from None
    folder_path = Path(folder)
    return HubSnapshot(folder_path.resolve(), ref.repo_id, folder_path.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


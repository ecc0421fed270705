"""Models named by path and by Hugging Face hub id, in specs and commands.

The hub cache is laid out on disk as huggingface_hub writes it (blobs, refs,
snapshots of relative symlinks) around real tiny safetensors checkpoints, and
HF_HUB_OFFLINE=1 keeps every test off the network.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from mergepipe import api
from mergepipe.catalog import schema
from mergepipe.planner.hub import HubRef, parse_hub_ref
from tests.conftest import write_spec
from tests.safety import one_line_error, refused, snapshot, tree


def cache_revision(cache: Path, repo_id: str, src: Path, refs: tuple[str, ...] = ()) -> str:
    """Put the files of ``src`` into the cache as one commit of ``repo_id``; returns its sha."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(f for f in src.iterdir() if f.is_file())
    sha = hashlib.sha1(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files)).hexdigest()
    for f in files:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / sha / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return sha


@pytest.fixture
def hub(tiny_family, tmp_path, monkeypatch) -> dict[str, str]:
    """org/tiny: main holds the base, tag v1 and a bare commit hold two experts."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"cache": str(cache),
            "main": cache_revision(cache, "org/tiny", tiny_family["base"], ("main",)),
            "v1": cache_revision(cache, "org/tiny", tiny_family["e1"], ("v1",)),
            "bare": cache_revision(cache, "org/tiny", tiny_family["e2"])}


def linear_spec(path: Path, refs: list[str], base: str | None = None) -> Path:
    doc = {"merge_method": "task_arithmetic" if base else "linear", "dtype": "float32",
           "models": [{"model": r, "parameters": {"weight": 0.5}} for r in refs]}
    if base:
        doc["base_model"] = base
    return write_spec(path, json.dumps(doc))


def sql(cli, query: str) -> list[dict]:
    return [json.loads(line) for line in cli("sql", query, "--format", "json").output.splitlines()]


def test_hub_ids_merge_from_the_cache_and_the_catalog_records_their_commits(cli, hub, tmp_path):
    spec = linear_spec(tmp_path / "s.yml", ["org/tiny@v1", f"org/tiny@{hub['bare']}"],
                       base="org/tiny")
    res = cli("apply", spec, "--out", tmp_path / "merged")
    rows = sql(cli, "SELECT name, repo_id, revision, path FROM models "
                    "WHERE repo_id IS NOT NULL ORDER BY created_at")
    assert {(r["repo_id"], r["revision"]) for r in rows} == {
        ("org/tiny", hub["main"]), ("org/tiny", hub["v1"]), ("org/tiny", hub["bare"])}
    for r in rows:  # each revision is its own snapshot folder, by its real path
        assert r["path"] == str((Path(hub["cache"]) / "models--org--tiny" / "snapshots"
                                 / r["revision"]).resolve())
    by_rev = {r["revision"]: r["name"] for r in rows}
    assert by_rev[hub["main"]] == "tiny"  # the base resolves first and gets the plain name
    assert by_rev[hub["v1"]] == f"org-tiny-{hub['v1'][:8]}"
    assert by_rev[hub["bare"]] == f"org-tiny-{hub['bare'][:8]}"
    notes = res.stderr.strip().splitlines()
    assert sum("is taken by org/tiny@" in n for n in notes) == 2
    lineage = sql(cli, "SELECT parent, role FROM lineage_view ORDER BY parent")
    assert sorted(r["parent"] for r in lineage) == sorted(by_rev.values())
    # named again, the same revisions are found, not registered twice, and nothing is said
    res = cli("plan", linear_spec(tmp_path / "t.yml", ["org/tiny@v1", "org/tiny"]))
    assert "registered" not in res.stderr
    assert sql(cli, "SELECT count(*) AS n FROM models WHERE repo_id IS NOT NULL") == [{"n": 3}]


def test_register_and_analyze_take_hub_ids(cli, hub, tmp_path):
    row = json.loads(cli("register", "org/tiny@v1", "--json").output)
    assert (row["name"], row["repo_id"], row["revision"]) == ("tiny", "org/tiny", hub["v1"])
    out = cli("analyze", "org/tiny@v1", "--base", "org/tiny", "--json").stdout
    assert json.loads(out)["analyzed"] == ["tiny"]
    assert sql(cli, "SELECT repo_id, revision FROM models ORDER BY revision") == sorted(
        [{"repo_id": "org/tiny", "revision": hub["v1"]},
         {"repo_id": "org/tiny", "revision": hub["main"]}], key=lambda r: r["revision"])
    # an explicit name that is taken still fails, naming who holds it
    refused(cli, ["register", f"org/tiny@{hub['bare']}", "--name", "tiny"],
            f"model name 'tiny' is already used for org/tiny@{hub['v1'][:12]}", [tmp_path])


def test_hf_home_is_where_the_cache_is_when_hf_hub_cache_is_unset(cli, hub, tmp_path,
                                                                  monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    row = json.loads(cli("register", "org/tiny", "--json").output)
    assert row["revision"] == hub["main"]


def test_a_missing_hub_id_fails_in_one_line_naming_id_and_revision(cli, hub, family, tmp_path):
    spec = linear_spec(tmp_path / "s.yml", ["org/absent", "org/tiny"])
    line = refused(cli, ["apply", spec, "--out", tmp_path / "m"], "hub model 'org/absent' "
                   "(revision 'main') is not in the Hugging Face cache", [tmp_path])
    assert "HF_HUB_OFFLINE=1" in line and hub["cache"] in line
    refused(cli, ["register", "org/absent@v3"], "'org/absent' (revision 'v3')", [tmp_path])
    task = write_spec(tmp_path / "t.jsonl", json.dumps({"prompt": "1+1=", "answer": "2"}))
    refused(cli, ["eval", "org/absent", "--task", task, "--device", "cpu"],
            "'org/absent' (revision 'main')", [tmp_path])
    refused(cli, ["analyze", "org/absent", "--base", family["base"]],
            "'org/absent' (revision 'main')", [tmp_path])


def test_a_missing_revision_fails_in_one_line_naming_what_is_cached(cli, hub, tmp_path):
    spec = linear_spec(tmp_path / "s.yml", ["org/tiny@v9", "org/tiny"])
    line = refused(cli, ["plan", spec], "hub model 'org/tiny' has no revision 'v9'", [tmp_path])
    assert "cached: main, v1" in line and "HF_HUB_OFFLINE=1" in line
    refused(cli, ["register", "org/tiny@" + "0" * 40], f"no revision '{'0' * 40}'", [tmp_path])
    line = refused(cli, ["register", "org/tiny@" + hub["v1"][:7]], "has no revision", [tmp_path])
    assert "a commit is named by all 40 hex digits" in line


def test_a_hub_model_without_safetensors_is_one_line(cli, hub, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"not read")
    cache_revision(Path(hub["cache"]), "org/legacy", legacy, ("main",))
    spec = linear_spec(tmp_path / "s.yml", ["org/legacy", "org/tiny"])
    line = refused(cli, ["plan", spec], "hub model 'org/legacy'", [tmp_path])
    assert "no safetensors weights found" in line


def test_online_without_a_reachable_hub_uses_the_cache_or_fails_in_one_line(cli, hub, tmp_path,
                                                                            monkeypatch):
    """With downloads allowed but no Hub to reach (huggingface_hub was imported
    offline by the test session), a cached revision is still used and a missing
    one fails in one line."""
    import huggingface_hub.constants
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # so no request leaves this machine
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    row = json.loads(cli("register", "org/tiny@v1", "--json").output)
    assert row["revision"] == hub["v1"]
    line = refused(cli, ["register", "org/absent"], "'org/absent' (revision 'main')", [tmp_path])
    assert "could not be reached" in line


def test_a_failed_plan_forgets_the_models_it_registered(cli, hub, family, tmp_path):
    cli("register", family["base"])
    spec = linear_spec(tmp_path / "s.yml", ["org/absent", str(family["e1"])], base="org/tiny")
    cli("init")
    before, files = snapshot(cli), tree(tmp_path)
    res = cli("apply", spec, "--out", tmp_path / "m", ok=False)
    assert res.exit_code != 0
    assert res.stderr.strip().splitlines()[-1].startswith("error: hub model 'org/absent'")
    assert snapshot(cli) == before and tree(tmp_path) == files


def test_a_taken_folder_name_gets_the_parent_folder_once(cli, tiny_family, tmp_path):
    a = Path(shutil.copytree(tiny_family["base"], tmp_path / "a" / "base"))
    b = Path(shutil.copytree(tiny_family["e1"], tmp_path / "b" / "base"))
    c = Path(shutil.copytree(tiny_family["e2"], tmp_path / "c" / "base"))
    cli("register", a)
    spec = linear_spec(tmp_path / "s.yml", [str(b), "base"])
    res = cli("apply", spec, "--out", tmp_path / "merged")
    notes = [n for n in res.stderr.splitlines() if n.startswith("registered")]
    assert notes == [f"registered {b} as 'b-base' (name 'base' is taken by {a})"]
    assert sql(cli, "SELECT path FROM models WHERE name = 'b-base'") == [{"path": str(b)}]
    res = cli("plan", linear_spec(tmp_path / "t.yml", [str(b), str(a)]))
    assert "registered" not in res.stderr  # said once, when it was registered
    # a symlink is the folder it points at: no new model
    (tmp_path / "link").symlink_to(b)
    cli("plan", linear_spec(tmp_path / "u.yml", [str(tmp_path / "link"), "base"]))
    assert sql(cli, "SELECT count(*) AS n FROM models WHERE kind = 'source'") == [{"n": 2}]
    # `register` without --name derives a name too; with a taken --name it fails as before
    refused(cli, ["register", c, "--name", "b-base"], "model name 'b-base' is already used",
            [tmp_path])
    res = cli("register", c)
    assert f"registered {c} as 'c-base' (name 'base' is taken by {a})" in res.stderr
    assert res.stdout.startswith("registered c-base:")


def test_a_missing_directory_or_plain_word_is_one_line(cli, tmp_path):
    refused(cli, ["register", tmp_path / "nowhere"], "does not exist", [tmp_path])
    refused(cli, ["register", "nowhere"], "model directory nowhere does not exist", [tmp_path])
    spec = linear_spec(tmp_path / "s.yml", ["./nowhere/base"])
    refused(cli, ["plan", spec], "is neither a catalog name, a model directory nor a hub id",
            [tmp_path])


def test_an_existing_directory_wins_over_a_hub_id(hub, tiny_family, tmp_path, monkeypatch):
    shutil.copytree(tiny_family["e3"], tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    with api.open_catalog(tmp_path / "ws") as cat:
        row = api.resolve_model(cat, "org/tiny")
        assert (row["path"], row["repo_id"]) == (str(tmp_path / "org" / "tiny"), None)


def test_hub_ids_are_told_from_paths():
    assert parse_hub_ref("org/name") == HubRef("org/name", None)
    assert parse_hub_ref("Org-1/model.v2_x@refs/pr/3") == HubRef("Org-1/model.v2_x", "refs/pr/3")
    assert parse_hub_ref("org/name@" + "a" * 40) == HubRef("org/name", "a" * 40)
    for not_hub in ("name", "./org/name", "/org/name", "~/org/name", "a/b/c", "org/name@",
                    "org--x/name", "org/na..me", "org/name.git", "org/ name", "-org/name"):
        assert parse_hub_ref(not_hub) is None, not_hub


def test_an_older_catalog_gains_the_hub_columns_on_open(tiny_family, tmp_path):
    home = tmp_path / "ws"
    with api.open_catalog(home) as cat:  # make it look like a version-1 catalog
        api.register(cat, tiny_family["base"])
        for view in schema.VIEWS:
            cat.conn.exec_driver_sql(f"DROP VIEW {view}")
        for col in ("repo_id", "revision"):
            cat.conn.exec_driver_sql(f"ALTER TABLE models DROP COLUMN {col}")
        cat.execute(schema.meta.update().where(schema.meta.c.key == "schema_version")
                    .values(value="1"))
        cat.conn.commit()
    with api.open_catalog(home, read_only=True) as cat:  # `mergepipe sql` opens it so
        assert api.run_sql(cat, "SELECT name, repo_id, revision FROM models") == [
            {"name": "base", "repo_id": None, "revision": None}]
        assert cat.rows(sa.select(schema.meta.c.value).where(
            schema.meta.c.key == "schema_version")) == [{"value": str(schema.SCHEMA_VERSION)}]
    with api.open_catalog(home) as cat:  # and opening it again changes nothing
        assert len(api.models(cat)) == 1

"""A merged model describes itself: README.md with hub metadata, parents, method, plan,
run and configuration, listed in the manifest so `verify` checks it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergepipe.catalog import schema
from mergepipe.runs.manifest import MANIFEST
from tests.conftest import ties_with_a_gradient, write_spec


def _card(out: Path) -> tuple[dict, str]:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _config(body: str) -> dict:
    return yaml.safe_load(body.split("```yaml\n", 1)[1].split("\n```", 1)[0])


def _register(cli, fam):
    for name, key in (("base", "base"), ("math", "e1"), ("code", "e2")):
        cli("register", fam[key], "--name", name)


def _ties(tmp_path: Path) -> Path:
    return ties_with_a_gradient(tmp_path / "ties.yml")


def test_card_names_the_base_parents_method_plan_and_run(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    spec = _ties(tmp_path)
    res = json.loads(cli("apply", spec, "--out", tmp_path / "m", "--json").output)
    meta, body = _card(tmp_path / "m")
    assert meta["base_model"] == str(tiny_family["base"].resolve())
    assert {"merge", "mergepipe"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert res["plan_id"] in body and res["run_id"] in body and "`ties`" in body
    parents = [line for line in body.splitlines() if line.startswith("| ") and "/" in line]
    assert [p.split(" | ")[0].strip("| ") for p in parents] == ["base", "math", "code"]
    assert [p.rsplit(" | ", 1)[1].strip(" |") for p in parents] == ["base", "expert", "expert"]
    assert str(tiny_family["e2"].resolve()) in parents[2]
    assert _config(body) == yaml.safe_load(spec.read_text())


def test_card_is_in_the_manifest_and_the_folder_still_loads(cli, tiny_family, tmp_path):
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    _register(cli, tiny_family)
    out = tmp_path / "m"
    cli("apply", _ties(tmp_path), "--out", out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert "README.md" in manifest["side_files"]
    assert cli("verify", out).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    saved = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert all(state[k].equal(v) for k, v in saved.items())
    (out / "README.md").write_text((out / "README.md").read_text() + "edited\n")
    assert "README.md: differs from the manifest" in cli("verify", out, ok=False).stderr


def test_overwrite_replaces_a_previous_merge_and_its_card(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    out = tmp_path / "m"
    first = json.loads(cli("apply", _ties(tmp_path), "--out", out, "--json").output)
    other = write_spec(tmp_path / "ta.yml", "merge_method: task_arithmetic\nbase_model: base\n"
                       "models:\n  - model: math\n    parameters: {weight: 0.5}\n")
    second = json.loads(cli("apply", other, "--out", out, "--overwrite", "--json").output)
    _, body = _card(out)
    assert second["run_id"] in body and first["run_id"] not in body
    assert "`task_arithmetic`" in body and cli("verify", out).exit_code == 0


def test_a_method_without_base_lists_every_parent(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    spec = write_spec(tmp_path / "lin.yml", "merge_method: linear\nmodels:\n"
                      "  - model: math\n    parameters: {weight: 0.5}\n"
                      "  - model: code\n    parameters: {weight: 0.5}\n")
    cli("apply", spec, "--out", tmp_path / "lin")
    meta, _ = _card(tmp_path / "lin")
    assert meta["base_model"] == [str(tiny_family[k].resolve()) for k in ("e1", "e2")]


def test_a_reused_commit_keeps_the_card_of_the_run_that_wrote_it(cli, tiny_family, tmp_path):
    _register(cli, tiny_family)
    spec = _ties(tmp_path)
    first = json.loads(cli("apply", spec, "--out", tmp_path / "a", "--json").output)
    cli("apply", spec, "--out", tmp_path / "b")
    card = (tmp_path / "a" / "README.md").read_bytes()
    assert (tmp_path / "b" / "README.md").read_bytes() == card
    assert first["run_id"] in _card(tmp_path / "b")[1]


@pytest.mark.skipif("repo_id" not in schema.models.c, reason="the catalog records no hub ids")
def test_card_names_a_hub_base_by_its_repo_id_and_revision(cli, tiny_family, tmp_path):
    from mergepipe.catalog.store import open_catalog
    _register(cli, tiny_family)
    with open_catalog(cli.home) as cat:
        cat.execute(schema.models.update().where(schema.models.c.name == "base").values(
            repo_id="example-org/tiny-base", revision="0123abcd"))
    cli("apply", _ties(tmp_path), "--out", tmp_path / "m")
    meta, body = _card(tmp_path / "m")
    assert meta["base_model"] == "example-org/tiny-base"
    assert "| base | example-org/tiny-base | 0123abcd | base |" in body


def test_reusing_a_commit_without_a_card_adds_one(cli, tiny_family, tmp_path):
    """A commit made before cards existed: its reuse gets a card naming the run that
    wrote the weights."""
    _register(cli, tiny_family)
    spec = _ties(tmp_path)
    first = json.loads(cli("apply", spec, "--out", tmp_path / "a", "--json").output)
    (tmp_path / "a" / "README.md").unlink()
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    del manifest["side_files"]["README.md"]
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(manifest))
    res = json.loads(cli("apply", spec, "--out", tmp_path / "b", "--json").output)
    assert res["reused"] and res["reused_from"] == first["out"]
    meta, body = _card(tmp_path / "b")
    assert meta["base_model"] == str(tiny_family["base"].resolve()) and first["run_id"] in body
    assert cli("verify", tmp_path / "b").exit_code == 0

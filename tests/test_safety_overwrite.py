"""`--overwrite` and every other deletion touch nothing but the output's own previous commit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import sqlalchemy as sa

from mergepipe.catalog import schema
from mergepipe.catalog.store import new_id, now, open_catalog
from tests.safety import models, one_line_error, refused, ta_spec, tree

SHARD = "model.safetensors"


def _registered(cli, family):
    for name in ("base", "e1", "e2", "e3"):
        cli("register", family[name], "--name", name)


def test_out_is_the_workspace(cli, family, tmp_path):
    _registered(cli, family)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", cli.home, "--overwrite"], "is or holds the workspace",
            [cli.home, tmp_path / "models"])
    refused(cli, ["apply", spec, "--out", tmp_path, "--overwrite"], "is or holds the workspace",
            [cli.home, tmp_path / "models"])
    assert len(models(cli)) == 4


def test_out_is_an_input_model_folder(cli, family, tmp_path):
    _registered(cli, family)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", family["e1"], "--overwrite"], "is registered model 'e1'",
            [tmp_path / "models", cli.home])
    assert (family["e1"] / SHARD).exists() and models(cli)["e1"]["kind"] == "source"
    res = cli("lineage", "e1")
    assert "no recorded parents" in res.output


def test_out_is_an_input_given_by_path(cli, family, tmp_path):
    cli("init")
    spec = ta_spec(tmp_path / "s.yml", family["base"], [family["e1"], family["e2"]])
    refused(cli, ["apply", spec, "--out", family["e2"], "--overwrite"], "not a MergePipe output",
            [tmp_path / "models", cli.home])
    assert models(cli) == {}


def test_out_is_a_parent_of_the_inputs(cli, family, tmp_path):
    _registered(cli, family)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", tmp_path / "models", "--overwrite"],
            "holds registered model", [tmp_path / "models", cli.home])


def test_out_is_another_registered_source_model(cli, family, tmp_path):
    _registered(cli, family)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", family["e3"], "--overwrite"],
            "is registered model 'e3', not a previous merge output", [tmp_path / "models"])


def test_out_is_a_user_folder(cli, family, tmp_path):
    _registered(cli, family)
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "thesis.tex").write_text("years of work")
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", mine, "--overwrite"], "not a MergePipe output",
            [mine, cli.home])


def test_previous_output_with_a_user_file_added(cli, family, tmp_path):
    _registered(cli, family)
    out = tmp_path / "merged"
    cli("apply", ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"]), "--out", out)
    (out / "notes.txt").write_text("mine")
    spec = ta_spec(tmp_path / "s2.yml", "base", ["e1", "e2"], "{weight: 0.3}")
    refused(cli, ["apply", spec, "--out", out, "--overwrite"], "'notes.txt', which the previous "
            "merge did not write", [out])
    (out / "notes.txt").unlink()
    cli("apply", spec, "--out", out, "--overwrite")
    assert cli("verify", out).exit_code == 0


def test_previous_output_that_is_a_parent_cannot_be_replaced(cli, family, tmp_path):
    """Replacing a merged model that another merge used would make a lineage cycle possible."""
    _registered(cli, family)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    cli("apply", ta_spec(tmp_path / "a.yml", "base", ["e1", "e2"]), "--out", m1)
    cli("apply", ta_spec(tmp_path / "b.yml", "base", ["m1", "e3"]), "--out", m2)
    refused(cli, ["apply", ta_spec(tmp_path / "c.yml", "base", ["m2", "e1"]), "--out", m1,
                  "--overwrite"], "a parent of 'm2'", [m1, m2, cli.home])
    refused(cli, ["apply", ta_spec(tmp_path / "d.yml", "base", ["m2", "e2"]), "--out", m2,
                  "--overwrite"], "is an input of this merge", [m1, m2])


def test_lineage_ends_on_a_catalog_with_a_cycle(cli, family, tmp_path):
    """Older versions could record a model as its own parent; `lineage` must still end."""
    _registered(cli, family)
    cli("apply", ta_spec(tmp_path / "a.yml", "base", ["e1", "e2"]), "--out", tmp_path / "m1")
    ids = {n: m["model_id"] for n, m in models(cli).items()}
    with open_catalog(cli.home) as cat:
        run = cat.rows(sa.select(schema.runs))[0]
        plan_id, run_id = run["plan_id"], run["run_id"]
        cat.execute(schema.lineage.insert(), [
            dict(child_model_id=ids["m1"], parent_model_id=ids["m1"], role="expert", weight=1.0,
                 params_json=None, plan_id=plan_id, run_id=run_id),
            dict(child_model_id=ids["e1"], parent_model_id=ids["m1"], role="expert", weight=1.0,
                 params_json=None, plan_id=plan_id, run_id=run_id)])
    rows = [json.loads(x) for x in cli("lineage", "m1", "--format", "json").output.splitlines()]
    assert {(r["child"], r["parent"]) for r in rows} == {
        ("m1", "base"), ("m1", "e1"), ("m1", "e2"), ("m1", "m1"), ("e1", "m1")}
    assert max(r["depth"] for r in rows) == 2


def test_out_is_a_file(cli, family, tmp_path):
    _registered(cli, family)
    f = tmp_path / "out.bin"
    f.write_bytes(b"precious")
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    for extra in ([], ["--overwrite"]):
        refused(cli, ["apply", spec, "--out", f, *extra], "is not a directory", [tmp_path])
    refused(cli, ["apply", spec, "--out", f / "merged"], "is not a directory", [tmp_path])
    line = refused(cli, ["apply", spec, "--out", f / "deeper" / "merged"], "Not a directory: ",
                   [tmp_path])  # as the OS says it, with the path
    assert str(f) in line
    assert f.read_bytes() == b"precious"


def test_taken_name_is_refused_before_anything_is_written(cli, family, tmp_path):
    _registered(cli, family)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    refused(cli, ["apply", spec, "--out", tmp_path / "new", "--name", "e1"],
            "model name 'e1' is already used", [tmp_path])
    (tmp_path / "e2").mkdir()  # the default name is the folder's: taken as well
    refused(cli, ["apply", spec, "--out", tmp_path / "x" / "e2"], "model name 'e2' is already used",
            [tmp_path])


def test_recover_keeps_the_requested_name(cli, family, tmp_path):
    _registered(cli, family)
    out = tmp_path / "merged"
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    proc = subprocess.run([sys.executable, "-m", "mergepipe", "--home", str(cli.home), "apply",
                           str(spec), "--out", str(out), "--name", "my-merge"],
                          env={**os.environ, "MERGEPIPE_CRASH_AT": "after_rename"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and out.exists()
    assert "my-merge" not in models(cli)
    cli("recover")
    m = models(cli)["my-merge"]
    assert m["path"] == str(out) and m["kind"] == "merged" and "merged" not in models(cli)
    assert cli("verify", out).exit_code == 0


def test_recover_removes_only_the_runs_own_folders(cli, family, tmp_path):
    """A PENDING row naming someone else's folder as staging must not get it deleted."""
    cli("init")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep")
    with open_catalog(cli.home) as cat:
        cat.execute(schema.runs.insert().values(
            run_id=new_id(), plan_id="0" * 64, status="PENDING", out_path=str(tmp_path / "o"),
            staging_path=str(victim), pid=2**22 + 12345, host="elsewhere", started_at=now()))
    before = tree(tmp_path / "victim")
    cli("recover")
    assert tree(tmp_path / "victim") == before


def test_out_parent_is_read_only(cli, family, tmp_path):
    """The OS refusal becomes one line naming the path; nothing is left behind."""
    _registered(cli, family)
    locked = tmp_path / "locked"
    locked.mkdir()
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    os.chmod(locked, 0o555)
    immutable = False
    try:
        probe = locked / ".probe"
        try:
            probe.mkdir()
            probe.rmdir()  # root ignores modes: make the folder immutable instead
            immutable = subprocess.run(["chattr", "+i", str(locked)],
                                       capture_output=True).returncode == 0
            if not immutable:
                import pytest
                pytest.skip("cannot make a folder unwritable here (root without chattr)")
        except PermissionError:
            pass
        line = refused(cli, ["apply", spec, "--out", locked / "merged"], str(locked),
                       [tmp_path])
        assert "ermission denied" in line or "not permitted" in line
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        os.chmod(locked, 0o755)


def test_new_parent_folders_are_removed_when_a_run_fails(cli, family, tmp_path):
    """A failed run leaves no staging folder and no folders it created to hold it."""
    _registered(cli, family)
    spec = ta_spec(tmp_path / "s.yml", "base", ["e1", "e2"])
    import safetensors.torch as st
    sd = st.load_file(family["e2"] / SHARD)
    sd["model.norm.weight"][0] = float("nan")
    st.save_file(sd, family["e2"] / SHARD, metadata={"format": "pt"})
    cli("register", family["e2"], "--name", "e2")
    res = cli("apply", spec, "--out", tmp_path / "a" / "b" / "merged", ok=False)
    one_line_error(res, "NaN or Inf")
    assert not (tmp_path / "a").exists()

"""Every failure of the command line is one `error: …` line on stderr and a nonzero exit.

Click's own usage errors (unknown command or option, missing argument, bad
value, a path that must exist) go through the same door as the library's
errors, at the top level and inside the `search` and `world` groups alike.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# {tmp}: the test's temporary directory; {file}: a file there; {dir}: an empty folder there
BAD = [
    # unknown commands and options, at every level
    ["nosuch"], ["--bogus"], ["search", "nosuch"], ["world", "nosuch"],
    ["models", "--bogus"], ["search", "run", "--bogus", "{file}"], ["world", "build", "--bogus"],
    # missing arguments and options
    ["sql"], ["explain"], ["lineage"], ["register"], ["verify"], ["apply"], ["apply", "{file}"],
    ["search", "run"], ["search", "resume"], ["search", "pareto"], ["analyze"],
    ["analyze", "x"], ["eval", "x"], ["--home"], ["apply", "{file}", "--out"],
    # paths that must exist, or must be a folder / a file
    ["register", "{tmp}/nonexistent"], ["register", "{file}"], ["verify", "{tmp}/nonexistent"],
    ["search", "run", "{tmp}/missing.yml"], ["search", "run", "{dir}"], ["plan", "{dir}"],
    ["world", "build", "--size", "test", "--dir", "{file}"],
    # bad choices and values
    ["world", "build", "--size", "huge"], ["demo", "--size", "huge"],
    ["models", "--format", "xml"], ["lineage", "x", "--format", "yaml"],
    ["explain", "x", "--format", "html"], ["sql", "SELECT 1", "--format", "xml"],
    ["sql", "SELECT 1", "--timeout", "soon"], ["eval", "x", "--task", "t", "--limit", "many"],
    ["eval", "x", "--task", "t", "--backend", "onnx"], ["plan", "{file}", "--seed", "one"],
    ["apply", "{file}", "--out", "{tmp}/o", "--io-budget", "10"],
    ["apply", "{file}", "--out", "{tmp}/o", "--device", "nosuch"], ["demo", "--device", "tpu"],
    ["eval", "x", "--task", "t", "--device", "gpu0"],
    # errors the library reports
    ["lineage", "nosuch"], ["explain", "nosuch"], ["sql", "DROP TABLE models"],
    ["sql", "SELECT * FROM nosuch"], ["plan", "{tmp}/missing.yml"], ["plan", "{file}"],
    ["apply", "--out", "{tmp}/o"], ["apply", "{file}", "--plan", "abc", "--out", "{tmp}/o"],
    ["apply", "--plan", "nosuch", "--out", "{tmp}/o"], ["verify", "{dir}"],
    ["search", "status", "nosuch"], ["search", "resume", "nosuch"], ["search", "pareto", "nosuch"],
    ["search", "run", "{file}"], ["eval", "nosuch", "--task", "{tmp}/missing.jsonl"],
    ["analyze", "nosuch", "--base", "nosuch"],
    # values that would be silently useless
    ["register", "{dir}", "--name", ""], ["register", "{dir}", "--name", " base"],
    ["eval", "x", "--task", "t", "--batch-size", "0"], ["eval", "x", "--task", "t", "--limit", "0"],
    ["eval", "x", "--task", "t", "--max-new-tokens", "0"],
    ["world", "build", "--size", "test", "--dir", "{notworld}"],
    # a missing model fails before any world is built (no world cache afterwards)
    ["eval", "nosuch", "--task", "world-test"],
]


def fill(args: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir(exist_ok=True)
    spec = tmp_path / "spec.yml"
    spec.write_text("merge_method: nosuch\nmodels: []\n")
    notworld = tmp_path / "notworld"
    (notworld / "base").mkdir(parents=True, exist_ok=True)
    (notworld / "base" / "keep.txt").write_text("mine")
    return [a.format(tmp=tmp_path, file=spec, dir=tmp_path / "empty", notworld=notworld)
            for a in args]


def assert_one_error_line(res_stdout: str, res_stderr: str, code: int) -> None:
    assert code != 0, res_stdout
    assert res_stdout == ""
    lines = res_stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 10, res_stderr


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_invocation_is_one_error_line(args, cli, tmp_path):
    res = cli(*fill(args, tmp_path), ok=False)
    assert_one_error_line(res.stdout, res.stderr, res.exit_code)


def test_usage_errors_name_the_problem_and_the_help_to_read(cli, tmp_path):
    res = cli("register", tmp_path / "nonexistent", ok=False)
    assert res.exit_code != 0  # a path or a hub id: the library says which it is not
    assert "nonexistent" in res.stderr and "does not exist" in res.stderr
    res = cli("verify", tmp_path / "nonexistent", ok=False)
    assert res.exit_code == 2 and "does not exist" in res.stderr
    assert "'mergepipe verify --help'" in res.stderr
    res = cli("world", "build", "--size", "huge", ok=False)
    assert "'huge' is not one of 'test', 'default'" in res.stderr
    assert "'mergepipe world build --help'" in res.stderr


@pytest.mark.parametrize("args", [["register", "/nonexistent-dir"], ["--bogus"],
                                  ["search", "run", "missing.yml"], ["world", "build", "--size",
                                                                     "huge"]])
def test_a_shell_sees_one_line_too(args, tmp_path):
    """The real entry point, in a fresh interpreter, as a user's shell runs it."""
    res = subprocess.run([sys.executable, "-m", "mergepipe", *args], capture_output=True,
                         text=True, cwd=tmp_path, env=_env(tmp_path))
    assert_one_error_line(res.stdout, res.stderr, res.returncode)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["search"], ["world"],
                                  ["search", "--help"], ["register", "--help"],
                                  ["search", "run", "--help"], ["world", "build", "-h"]])
def test_help_is_not_an_error(args, cli):
    """--help, and a group called without a command, print help on stdout and exit 0."""
    res = cli(*args)
    assert res.exit_code == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: ")


def test_an_unforeseen_exception_is_one_line_too(cli, monkeypatch):
    """A bug still ends in one line, naming the exception; MERGEPIPE_DEBUG=1 shows it whole."""
    from mergepipe import api

    def broken(cat):
        raise ValueError("something nobody expected")
    monkeypatch.setattr(api, "models", broken)
    res = cli("models", ok=False)
    assert_one_error_line(res.stdout, res.stderr, res.exit_code)
    assert "unexpected ValueError: something nobody expected" in res.stderr
    monkeypatch.setenv("MERGEPIPE_DEBUG", "1")
    with pytest.raises(ValueError):
        cli("models", ok=False)


def test_bare_mergepipe_prints_help(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mergepipe"], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(tmp_path))
    assert res.returncode == 0 and res.stderr == "" and res.stdout.startswith("Usage: mergepipe")


def _env(tmp_path: Path) -> dict[str, str]:
    import os
    return {**os.environ, "MERGEPIPE_HOME": str(tmp_path / "ws"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_refusals_touch_nothing(cli, tmp_path, monkeypatch):
    """A folder that is not a world is not overwritten; a missing model builds no world."""
    monkeypatch.setenv("MERGEPIPE_CACHE", str(tmp_path / "cache"))
    args = fill(["world", "build", "--size", "test", "--dir", "{notworld}"], tmp_path)
    assert cli(*args, ok=False).exit_code != 0
    assert (tmp_path / "notworld" / "base" / "keep.txt").read_text() == "mine"
    res = cli("eval", "nosuch", "--task", "world-test", ok=False)
    assert "nosuch" in res.stderr and not (tmp_path / "cache").exists()

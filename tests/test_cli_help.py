"""Help that teaches: every command and option says what it does, and `search run --help`
lists every config key with its default and every algorithm."""
from __future__ import annotations

from dataclasses import MISSING, fields

import click
import pytest

from mergepipe import api
from mergepipe.cli import cli as mergepipe_cli


def every_command(cmd: click.Command = mergepipe_cli, path: str = "mergepipe"):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from every_command(sub, f"{path} {name}")


COMMANDS = list(every_command())


def test_the_walk_sees_the_groups_and_their_commands():
    paths = {p for p, _ in COMMANDS}
    assert {"mergepipe apply", "mergepipe search run", "mergepipe world build",
            "mergepipe demo", "mergepipe verify"} <= paths


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_and_option_is_described(path, cmd):
    assert (cmd.help or "").strip(), f"{path} has no description"
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert (p.help or "").strip(), f"{path} {p.opts[0]} has no description"


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_help_prints_and_exits_0(path, cmd, cli):
    res = cli(*path.split()[1:], "--help")
    assert res.exit_code == 0 and res.stdout.startswith(f"Usage: {path}")
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert p.opts[0] in res.stdout


def test_search_run_help_lists_config_keys_defaults_and_algorithms(cli):
    from mergepipe.search.algorithms import ALGORITHMS  # the names the search runs
    from mergepipe.search.config import SearchConfig
    out = " ".join(cli("search", "run", "--help").stdout.split())  # undo line wrapping
    keys = [f.name for f in fields(SearchConfig)]
    for key in keys:
        assert f" {key} " in out, key
    for f in fields(SearchConfig):
        if f.default is not MISSING and f.default is not None:
            assert f"[default: {str(f.default).lower()}]" in out, f.name
    for name in ALGORITHMS:
        assert f" {name} " in out, name
    assert list(api.search_algorithms()) == list(ALGORITHMS)
    assert [k for k, _, _ in api.search_config_keys()] == keys

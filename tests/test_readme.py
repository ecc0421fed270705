"""The README works as written: its ```bash and ```python blocks run in order, in one
shell, in an empty folder, and each exits 0.

A person follows the README in one shell, so the blocks share one: a variable a
block sets (``MERGEPIPE_HOME``, ``$RUN``, ``$SEARCH``) is there for the next one.
HOME, MERGEPIPE_CACHE and HF_HOME point into the test's temporary directory, so the
README's clean-up block (which removes ~/.mergepipe and the world cache) removes
only the test's copies; the test then checks that nothing is left.

What the test changes, and why (nothing else is touched):

- The set-up block's ``pip install …`` is not run (the package is importable here
  and installing would change the shared environment), nor is its
  ``python -m pytest -q`` (this test is part of that suite). Its ``mergepipe demo``
  is run.
- ``mergepipe demo`` and ``mergepipe world build`` get ``--size test``: the
  default world trains for minutes; the test world is the one the other tests
  build, copied here from their cache.
- The search config's budget ``n_init: 8``, ``n_total: 40``, ``workers: 4``
  becomes 2, 4 and 2, with ``limit: 8`` problems per task: the README shows a
  real search; this test checks that its commands run, not what they find.
- ``mergepipe`` is this checkout's package (``python -m mergepipe``), whatever
  console script the environment has installed.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from world_fixtures import built_test_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP_TAIL = ("mergepipe demo", "python -m pytest -q")  # what the two set-up lines end with

SEARCH_BUDGET = (("n_init: 8", "n_init: 2"), ("n_total: 40", "n_total: 4\nlimit: 8"),
                 ("workers: 4", "workers: 2"))


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every bash and python block, in order."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", text, flags=re.M | re.S)


def adapt(lang: str, code: str) -> str:
    """The block as the test runs it (see the module docstring for each change)."""
    if lang == "bash" and "pip install" in code:
        lines = [ln.split("&&")[-1].strip() for ln in code.splitlines() if ln.strip()]
        assert [ln for ln in lines] == list(SETUP_TAIL), lines
        code = "mergepipe demo\n"
    code = re.sub(r"\bmergepipe demo\b", "mergepipe demo --size test", code)
    code = re.sub(r"\bmergepipe world build\b", "mergepipe world build --size test", code)
    if "n_total:" in code:
        for old, new in SEARCH_BUDGET:
            assert old in code, f"the README's search config no longer says {old!r}"
            code = code.replace(old, new)
    return code


def test_readme_blocks_are_found_and_adapted():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 4 and blocks[0][0] == "bash" and "pip install" in blocks[0][1]
    first = README.read_text().split("```")[0]
    assert first.startswith("# MergePipe")  # the set-up block comes first, after the intro
    assert adapt(*blocks[0]) == "mergepipe demo --size test\n"
    search = next(code for lang, code in blocks if "n_total:" in code)
    assert "n_total: 4\nlimit: 8" in adapt("bash", search)
    assert any("mergepipe world build" in code for _, code in blocks)


def test_readme_runs_as_written(tmp_path):
    blocks = readme_blocks(README.read_text())
    home, session, scripts, bin_dir = (tmp_path / d for d in ("home", "session", "scripts", "bin"))
    for d in (home, session, scripts, bin_dir):
        d.mkdir()
    world = built_test_world()  # shared with the other world tests in this session
    cache = home / ".cache" / "mergepipe"
    shutil.copytree(world, cache / "world" / world.name)
    shim = bin_dir / "mergepipe"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mergepipe "$@"\n')
    shim.chmod(0o755)

    driver = ["set -eo pipefail"]
    for i, (lang, code) in enumerate(blocks):
        body = adapt(lang, code)
        path = scripts / f"block{i}.{'sh' if lang == 'bash' else 'py'}"
        path.write_text(body)
        driver.append(f'echo "::block {i} ({lang})" >&2')
        driver.append(f'source "{path}"' if lang == "bash" else f'"{sys.executable}" "{path}"')
        driver.append(f'echo "::block {i} ok" >&2')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGEPIPE_")}
    env.update({"HOME": str(home), "MERGEPIPE_CACHE": str(cache),
                "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
                "MPLCONFIGDIR": str(home / ".config" / "mpl"),
                "HF_HOME": str(home / ".cache" / "huggingface"),
                "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
                    os.pathsep)})
    res = subprocess.run(["bash", "-c", "\n".join(driver)], cwd=session, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-4000:])
    for i in range(len(blocks)):
        assert f"::block {i} ok" in res.stderr
    out = res.stdout
    assert "world-test-merged" in out  # the demo's lineage query found its merge
    assert "committed mix" in out and "ok: " in out  # the session merged and verified
    # the clean-up block leaves nothing behind
    assert list(session.iterdir()) == []
    assert not (home / ".mergepipe").exists() and not cache.exists()


@pytest.mark.parametrize("lang,code", [("bash", "mergepipe world build --dir ./w\n"),
                                       ("bash", "x=1 mergepipe demo\n")])
def test_adapt_uses_the_test_world(lang, code):
    assert "--size test" in adapt(lang, code)

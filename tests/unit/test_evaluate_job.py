"""The evaluation driver's process settings (``ecgvlm.evaluate.job``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_POOL_SCRIPT = (
    "import pyarrow as pa\n"
    "from ecgvlm.evaluate import use_returning_arrow_pool\n"
    "before = pa.default_memory_pool().backend_name\n"
    "chosen = use_returning_arrow_pool()\n"
    "print(before, chosen, pa.default_memory_pool().backend_name)\n"
)


def _pools(**env: str) -> list[str]:
    """(pool before, the name returned, pool after) in a fresh process: the pool is global."""
    clean = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**clean, "PYTHONPATH": str(REPO), **env})
    return out.stdout.split()


def test_the_driver_allocates_arrow_memory_from_a_pool_that_gives_pages_back():
    _, chosen, after = _pools()  # before: pyarrow's default (mimalloc here)
    assert chosen == after and after in ("jemalloc", "system")


def test_a_pool_named_in_the_environment_is_kept():
    assert _pools(ARROW_DEFAULT_MEMORY_POOL="mimalloc") == ["mimalloc"] * 3
    assert _pools(ARROW_DEFAULT_MEMORY_POOL="system") == ["system"] * 3

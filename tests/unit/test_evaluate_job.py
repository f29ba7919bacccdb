"""The evaluation driver's process settings (``ecgvlm.evaluate.job``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Which allocators served a process that wrote and read Parquet (the read through the datasets
# API, whose C++ readers take the pool ARROW_DEFAULT_MEMORY_POOL picks when pyarrow loads).
_POOL_SCRIPT = (
    "import os, sys, tempfile, warnings\n"
    "if sys.argv[1] == 'late':\n"
    "    import pyarrow\n"
    "from ecgvlm.evaluate import use_returning_arrow_pool\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    chosen = use_returning_arrow_pool()\n"
    "import pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq\n"
    "path = os.path.join(tempfile.mkdtemp(), 'x.parquet')\n"
    "pq.write_table(pa.table({'x': list(range(200_000, 0, -1))}), path)\n"
    "table = ds.dataset(path).to_table().sort_by('x')\n"
    "print(chosen, pa.default_memory_pool().backend_name,\n"
    "      os.environ.get('ARROW_DEFAULT_MEMORY_POOL'),\n"
    "      pa.mimalloc_memory_pool().max_memory() > 0,\n"
    "      pa.system_memory_pool().max_memory() > 0, len(caught))\n"
)


def _run_fresh(script: str, *args: str, **env: str) -> str:
    """What ``script`` printed in a fresh Python (Arrow's pools are process-wide)."""
    clean = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True,
                          text=True, check=True,
                          env={**clean, "PYTHONPATH": str(REPO), **env}).stdout


def _pools(when: str = "first", **env: str) -> list[str]:
    """(pool returned, pyarrow's pool, the variable, mimalloc used by the read, system used,
    warnings) in a fresh process that calls ``use_returning_arrow_pool`` ``when``."""
    return _run_fresh(_POOL_SCRIPT, when, **env).split()


def test_the_driver_and_its_readers_allocate_arrow_memory_from_the_system_allocator():
    assert _pools() == ["system", "system", "system", "False", "True", "0"]


def test_too_late_for_the_readers_it_says_so():
    chosen, pyarrow_pool, variable, mimalloc_used, _, warned = _pools("late")
    assert (chosen, pyarrow_pool, variable, warned) == ("system", "system", "system", "1")
    assert mimalloc_used == "True"  # the readers kept the pool chosen at import


def test_a_pool_named_in_the_environment_is_kept():
    chosen, pyarrow_pool, variable, mimalloc_used, _, warned = _pools(
        ARROW_DEFAULT_MEMORY_POOL="mimalloc")
    assert (chosen, pyarrow_pool, variable, mimalloc_used, warned) == (
        "mimalloc", "mimalloc", "mimalloc", "True", "0")


# Arrow buffers of 8 KiB (below glibc's mmap threshold, so inside its heap) from the system
# pool; every 64th and the last stay alive, so the heap's top cannot shrink by itself and the
# freed pages stay resident until something trims the free chunks between the survivors.
_TRIM_SCRIPT = (
    "import ctypes\n"
    "from ecgvlm.evaluate import use_returning_arrow_pool\n"
    "use_returning_arrow_pool()\n"
    "import pyarrow as pa\n"
    "from ecgvlm.evaluate.job import release_arrow_memory\n"
    "def anon_kb():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('RssAnon:'):\n"
    "            return int(line.split()[1])\n"
    "buffers = [pa.allocate_buffer(8192) for _ in range(8000)]\n"
    "for b in buffers:\n"
    "    ctypes.memset(b.address, 1, b.size)\n"
    "kept = buffers[::64] + buffers[-1:]\n"
    "del buffers, b\n"
    "freed_kb = anon_kb()\n"
    "release_arrow_memory()\n"
    "print(freed_kb, anon_kb(), pa.default_memory_pool().bytes_allocated())\n"
)


def test_release_arrow_memory_gives_back_the_pages_of_freed_arrow_buffers():
    # Linux and glibc, as everywhere the project runs (/proc, malloc_trim).
    freed_kb, released_kb, live_bytes = map(int, _run_fresh(_TRIM_SCRIPT).split())
    assert live_bytes == 126 * 8192  # the survivors, nothing else of Arrow's
    # About 62 MiB were written and freed between the survivors; most of it goes back.
    assert freed_kb - released_kb > 40 * 1024, (freed_kb, released_kb)

"""The evaluation driver's process settings (``ecgvlm.evaluate.memory``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    "import shutil; shutil.rmtree(os.path.dirname(path))\n"
    "print(chosen, pa.default_memory_pool().backend_name,\n"
    "      os.environ.get('ARROW_DEFAULT_MEMORY_POOL'),\n"
    "      pa.mimalloc_memory_pool().max_memory() > 0,\n"
    "      pa.system_memory_pool().max_memory() > 0, len(caught))\n"
)


def _run_fresh(script: str, *args: str, **env: str) -> str:
    """What ``script`` printed in a fresh Python (Arrow's pools are process-wide)."""
    from ecgvlm.evaluate.memory import SETTING_VARIABLES

    clean = {k: v for k, v in os.environ.items() if k not in SETTING_VARIABLES}
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
    "from ecgvlm.evaluate import release_arrow_memory\n"
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


# How many of 64 blocks of 256 KiB glibc gave mappings of their own after a freed 1 MiB block
# (which raises glibc's adjusting threshold to 1 MiB), in this process and in a child it starts
# afterwards (where a local Ray's worker would be); mallinfo2 counts the mapped blocks.
# argv: what to do first ('call' the function or 'skip' it), then this script's own text.
_MMAP_SCRIPT = (
    "import ctypes, subprocess, sys\n"
    "class Info(ctypes.Structure):\n"
    "    _fields_ = [(name, ctypes.c_size_t) for name in ('arena ordblks smblks hblks hblkhd '\n"
    "                'usmblks fsmblks uordblks fordblks keepcost').split()]\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.mallinfo2.restype = Info\n"
    "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "def mapped_of_64():\n"
    "    libc.free(libc.malloc(1 << 20))\n"
    "    before = libc.mallinfo2().hblks\n"
    "    blocks = [libc.malloc(256 << 10) for _ in range(64)]\n"
    "    return libc.mallinfo2().hblks - before\n"
    "if sys.argv[1] == 'call':\n"
    "    from ecgvlm.evaluate import use_fixed_mmap_threshold\n"
    "    print(use_fixed_mmap_threshold())\n"
    "print(mapped_of_64())\n"
    "if sys.argv[1] != 'child':\n"
    "    print(subprocess.run([sys.executable, '-c', sys.argv[2], 'child'], check=True,\n"
    "                         capture_output=True, text=True).stdout.strip())\n"
)


def _mapped(when: str, **env: str) -> list[str]:
    return _run_fresh(_MMAP_SCRIPT, when, _MMAP_SCRIPT, **env).split()


def test_large_blocks_stay_mapped_in_the_driver_and_in_the_processes_it_starts():
    threshold, driver, child = _mapped("call")
    assert threshold == str(128 * 1024)
    # A few may fit the free space the imports left in the driver's heap.
    assert int(driver) >= 48 and int(child) >= 48, (driver, child)
    # glibc's own rule, the control: after the freed 1 MiB block, all 64 come from the heap.
    assert _mapped("skip") == ["0", "0"]


def test_a_threshold_set_in_the_environment_is_kept():
    # glibc applied the user's 1 MiB when the process started; the call does not lower it.
    assert _mapped("call", MALLOC_MMAP_THRESHOLD_=str(1 << 20)) == [str(1 << 20), "0", "0"]


@pytest.mark.parametrize("threshold_bytes", [0, -1, 64 * 1024 * 1024])
def test_a_threshold_glibc_would_refuse_is_named(threshold_bytes):
    from ecgvlm.evaluate import use_fixed_mmap_threshold

    with pytest.raises(ValueError, match=str(threshold_bytes)):
        use_fixed_mmap_threshold(threshold_bytes)


def test_the_settings_handed_to_a_clusters_workers_are_those_set(monkeypatch):
    from ecgvlm.evaluate import settings_env_vars

    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert settings_env_vars() == {"MALLOC_MMAP_THRESHOLD_": "131072"}
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
    assert settings_env_vars() == {"ARROW_DEFAULT_MEMORY_POOL": "system",
                                   "MALLOC_MMAP_THRESHOLD_": "131072"}

"""How the evaluation driver's process allocates memory, so that what a phase frees goes back.

The evaluation driver runs for hours and holds only what the report needs; what it reads and
builds along the way (Arrow buffers, Parquet pages, Python rows) must go back to the
operating system when the phase ends, or its resident memory grows with the split
(docs/evaluate.md, "Cost as the split grows"). These are process-wide choices, so they belong
to the process that runs ``evaluate`` (``ecgvlm evaluate``, ``jobs/evaluate.py``,
``benchmarks/eval_scale.py``), which makes them first, before anything imports pyarrow;
the library itself never calls the two ``use_*`` functions:

* :func:`use_returning_arrow_pool`: Arrow (and its C++ readers) on the system allocator;
* :func:`use_fixed_mmap_threshold`: glibc's malloc hands large blocks to ``mmap`` always;
* :func:`release_arrow_memory`: after a phase, the free pages go back (``malloc_trim``).

Both ``use_*`` functions also set the environment variable that carries the choice to the
processes started afterwards: the workers of a local Ray that the caller starts next. The
workers of a cluster started elsewhere get them through the job's runtime env
(:func:`settings_env_vars`, which ``ecgvlm evaluate`` passes to ``ray.init``).
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

# mallopt's parameter number for the mmap threshold (glibc's malloc.h: M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3
# glibc refuses thresholds above HEAP_MAX_SIZE / 2, 32 MiB on 64-bit machines.
_MAX_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# glibc's own starting value, and the one measured (docs/evaluate.md).
MMAP_THRESHOLD_BYTES = 128 * 1024
#: The environment variables that carry this module's choices to other processes.
SETTING_VARIABLES = ("ARROW_DEFAULT_MEMORY_POOL", "MALLOC_MMAP_THRESHOLD_")


def settings_env_vars() -> dict[str, str]:
    """The memory settings this process runs with, as the environment variables that carry
    them (those of :data:`SETTING_VARIABLES` that are set), for the ``env_vars`` of a Ray
    job's runtime env: a cluster's workers, on any node, do not inherit this process's
    environment."""
    return {name: os.environ[name] for name in SETTING_VARIABLES if os.environ.get(name)}


def use_returning_arrow_pool() -> str:
    """Have Arrow allocate from the system allocator in this process, unless
    ``ARROW_DEFAULT_MEMORY_POOL`` names a pool; returns pyarrow's pool's backend.

    Arrow's C++ readers (Parquet, datasets, sorts) allocate from the pool that
    ``ARROW_DEFAULT_MEMORY_POOL`` picks when pyarrow loads, and ``pa.set_memory_pool`` does not
    reach them, so this sets the variable before it imports pyarrow (a local Ray started
    afterwards passes it on to its workers). pyarrow's default there (mimalloc) keeps the
    pages of buffers its reader threads allocated, also after ``release_unused()``: about
    40 MB in a 10k-row evaluation driver; the system allocator's free pages go back with
    :func:`release_arrow_memory` (glibc's ``malloc_trim``). Called after pyarrow's import, it
    sets pyarrow's own pool and warns: the readers keep theirs (docs/evaluate.md, "The system
    allocator for Arrow in the driver").
    """
    named = os.environ.get("ARROW_DEFAULT_MEMORY_POOL")
    loaded = "pyarrow" in sys.modules
    if not named:
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
    import pyarrow as pa

    if not named and loaded:
        warnings.warn(
            "use_returning_arrow_pool() was called after pyarrow was imported: Arrow's readers "
            f"keep the {pa.default_memory_pool().backend_name} pool; call it before importing "
            "pyarrow, or set ARROW_DEFAULT_MEMORY_POOL=system", stacklevel=2)
        pa.set_memory_pool(pa.system_memory_pool())
    return pa.default_memory_pool().backend_name


def use_fixed_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> int | None:
    """Have glibc's malloc serve every block of ``threshold_bytes`` or more with a mapping
    of its own, in this process and in those it starts afterwards, unless
    ``MALLOC_MMAP_THRESHOLD_`` is already set (glibc read it when this process started);
    returns the threshold in force, or None where the C library has no ``mallopt`` (or the
    variable is not a number).

    glibc starts at 128 KiB but raises its threshold to the size of each larger mapped
    block that is freed (mallopt(3), up to 32 MiB), so after the first freed Arrow buffers
    the later ones come from the heap. A fixed threshold keeps them mapped, and a freed one
    goes back to the system at once. In ``benchmarks/eval_scale.py`` (10k and 30k rows) it
    took 6-9 MB off the driver's peak and 130-330 MB off the Ray workers together
    (docs/evaluate.md, "glibc's mmap threshold by default"). Setting the threshold also turns
    glibc's adjustment off, and the variable carries it to the workers of a local Ray
    started next.
    """
    if not 0 < threshold_bytes <= _MAX_MMAP_THRESHOLD_BYTES:
        raise ValueError(f"threshold_bytes must be in (0, {_MAX_MMAP_THRESHOLD_BYTES}], "
                         f"got {threshold_bytes}")
    named = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    if named:
        return int(named) if named.isdigit() else None
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, threshold_bytes):
        return None
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold_bytes)
    return threshold_bytes


def release_arrow_memory() -> None:
    """Give the operating system back the pages Arrow's allocator keeps after a phase that
    read or built many Arrow buffers in this process.

    pyarrow's pools keep freed pages for reuse; ``release_unused`` returns them (for the
    system pool, on glibc, with ``malloc_trim``, which also returns the free pages of the
    driver's other native allocations). In the evaluation driver with mimalloc, after 10k
    predictions, that was about 30 MB of resident memory that no live buffer used
    (docs/evaluate.md).
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()

"""scripts/gpu_acceptance.sh on CPU (--device cpu --tiny), as the GPU machine would run it:
without Ray, wfdb or DeepSpeed importable; and the model path's imports stay that light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "wfdb", "deepspeed")
# Makes the heavy packages unimportable, as on the GPU machine, then runs the given script.
BLOCKED_RUN = f"""
import importlib.machinery, runpy, sys
class Absent:
    # Stands in for PathFinder: finds nothing named like the heavy packages (as if not installed).
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
    @staticmethod
    def invalidate_caches():
        importlib.machinery.PathFinder.invalidate_caches()
    @staticmethod
    def find_distributions(*args, **kwargs):
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)
sys.meta_path = [Absent if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)
    return env


def _run(*args: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "scripts" / "gpu_acceptance.py")
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, script, "--device", "cpu", "--tiny", *args],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def test_model_package_imports_no_ray_wfdb_or_deepspeed():
    code = (
        "import sys, ecgvlm.model, ecgvlm.infer, ecgvlm.render, ecgvlm.records; "
        # every name: the package imports its modules when a name is first used
        "[getattr(ecgvlm.model, name) for name in ecgvlm.model.__all__]; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_acceptance_smoke_on_cpu_without_heavy_packages():
    out = _run("--parity-dtypes", "bf16", "--train-steps", "1", "--gen-batches", "1,3",
               "--gen-tokens", "2")  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("PULSE acceptance on cpu") :]
    for name in ("flat", "spatial", "spatial_unpad", "flat_frozen_tower"):
        assert f"parity {name}" in table
    assert table.count(" pass") >= 6 and "FAIL" not in table
    assert "torch AdamW" in table  # DeepSpeed is not importable there
    assert "ecgvlm.render printout" in table
    for setting in ("batch 1, 2 new tokens", "batch 3, 2 new tokens"):
        assert setting in table and "ECGs/s" in table
    assert "tokens/s" in table and "MFU n/a" in table
    assert "clip layer" in table and "max |logit change| 0.0e+00" in table
    assert "serve batching" in table and "3 answers" in table


def test_acceptance_exits_1_on_parity_failure(tmp_path):
    golden = dict(np.load(ROOT / "tests" / "reference" / "golden_logits.npz"))
    golden["spatial/1/logits_tail"] = golden["spatial/1/logits_tail"] + 0.01
    bad = tmp_path / "golden.npz"
    np.savez_compressed(bad, **golden)
    out = _run("--parity-dtypes", "fp32", "--parity-only", "--golden", str(bad))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("parity ")}
    assert rows["spatial"].rstrip().endswith("FAIL") and "1.0e-02" in rows["spatial"]
    assert rows["flat"].rstrip().endswith("pass")


def test_wrapper_is_bounded_and_uses_python_env():
    wrapper = (ROOT / "scripts" / "gpu_acceptance.sh").read_text()
    assert "timeout 480" in wrapper and "gpu_acceptance.py" in wrapper
    assert '"$PYTHON"' in wrapper and "PYTHONPATH" in wrapper

"""The GPU check's CPU-side logic, run on a tiny checkpoint (the GPU path itself needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.unit.pulse_support import one_torch_thread  # noqa: F401

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_pulse", SCRIPTS / "gpu_check_pulse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_on_cpu(capsys):
    script = _load_script()
    assert script.main(["--tiny", "--device", "cpu", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for line in ("load time:", "peak memory:", "tokens/s", "prompt tokens", "answer:"):
        assert line in out
    # 2200x1700 printout -> 2x2 anyres grid -> 5 tiles x 16 patches in the tiny (56 px) model.
    prompt_tokens = int(out.split("prompt tokens (text + image features): ")[1].split()[0])
    assert prompt_tokens > 5 * 16
    wrapper = (SCRIPTS / "gpu_check_pulse.sh").read_text()
    assert "timeout 480" in wrapper and "gpu_check_pulse.py" in wrapper


def test_synthetic_printout_shape():
    image = _load_script().synthetic_printout(1100, 850)
    assert image.size == (1100, 850) and image.mode == "RGB"
    assert image.getpixel((0, 0)) != (255, 255, 255)  # grid line at the origin

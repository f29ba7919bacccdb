"""Helpers shared by the test_model_* files: llava_v1 prompts, test images, one torch thread."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# The llava_v1 template written out here on purpose (ecgvlm.prompt owns the real one); the
# parity test checks it against the reference's conv_templates["llava_v1"].
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)


def llava_v1(question: str) -> str:
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run 10x faster on one thread than on two on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

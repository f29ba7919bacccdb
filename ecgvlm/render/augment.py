"""Seeded augmentations of a printout, the kinds ECG-Image-Kit and PULSE train with.

Signal level: ``baseline_wander``. Grid level: ``grid_dropout``. Palette level: ``tint``
(cheap: the PNG stays a palette image). Image level, applied in this order on an RGB copy:
``rotation``, ``blur``, ``noise``, ``jpeg``; they make the PNG an RGB image (slower to
encode). ``rotation`` moves pixels, so the Printout's panel geometry is only approximate
afterwards (``Printout.geometry_exact`` is False); everything else leaves geometry exact.
"""

from __future__ import annotations

import io

import numpy as np

IMAGE_AUGMENTATIONS = ("rotation", "blur", "noise", "jpeg")  # these make the PNG RGB
MAX_ROTATION_DEG = 2.0
MAX_NOISE_SIGMA = 8.0  # grey levels
MAX_BLUR_RADIUS_PX = 0.9
JPEG_QUALITY_RANGE = (30, 75)
WANDER_MV = 0.25
WANDER_HZ = (0.05, 0.5)
DROPOUT_FRACTION = 0.25


def baseline_wander(
    shape: tuple[int, int], fs_hz: float, rng: np.random.Generator, strength: float
) -> np.ndarray:
    """Slow sinusoidal drift (mV) per lead, as respiration and electrode motion cause."""
    n, leads = shape
    t = np.arange(n)[:, None] / fs_hz
    freq = rng.uniform(*WANDER_HZ, size=(1, leads))
    phase = rng.uniform(0, 2 * np.pi, size=(1, leads))
    amp = rng.uniform(0.3, 1.0, size=(1, leads)) * WANDER_MV * strength
    return amp * np.sin(2 * np.pi * freq * t + phase)


def grid_dropout(grid: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Erase the grid in a few random rectangles (faded or missing printed grid)."""
    out = grid.copy()
    height, width = grid.shape
    for _ in range(int(rng.integers(1, 4))):
        w = int(width * rng.uniform(0.1, 0.4) * min(strength, 2.0) * DROPOUT_FRACTION * 2)
        h = int(height * rng.uniform(0.2, 0.6))
        x, y = int(rng.integers(0, max(width - w, 1))), int(rng.integers(0, max(height - h, 1)))
        out[y : y + h, x : x + w] = 0
    return out


def paper_tint(rng: np.random.Generator, strength: float) -> tuple[float, float, float]:
    """A yellowed or greyed paper colour (RGB 0-255)."""
    depth = rng.uniform(0.02, 0.10) * strength
    hue = rng.uniform([0.0, 0.1, 0.5], [0.3, 0.5, 1.0])  # more loss in blue: yellowing
    return tuple(float(v) for v in np.clip(255 * (1 - depth * hue), 0, 255))


def apply_image_augmentations(
    image, names: tuple[str, ...], rng, strength: float, paper: tuple[int, int, int]
):
    """Apply the image-level augmentations in ``names`` (no-op when there are none).

    ``paper`` is the page colour that rotation fills the uncovered corners with.
    """
    from PIL import Image, ImageFilter

    if not any(n in names for n in IMAGE_AUGMENTATIONS):
        return image
    rgb = image.convert("RGB")
    if "rotation" in names:
        angle = float(rng.uniform(-1, 1)) * MAX_ROTATION_DEG * strength
        rgb = rgb.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=paper)
    if "blur" in names:
        radius = float(rng.uniform(0.3, 1.0)) * MAX_BLUR_RADIUS_PX * strength
        rgb = rgb.filter(ImageFilter.GaussianBlur(radius))
    if "noise" in names:
        sigma = float(rng.uniform(0.3, 1.0)) * MAX_NOISE_SIGMA * strength
        arr = np.asarray(rgb, dtype=np.float32)
        arr = arr + rng.normal(0.0, sigma, size=arr.shape[:2])[:, :, None].astype(np.float32)
        rgb = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    if "jpeg" in names:
        low, high = JPEG_QUALITY_RANGE
        quality = round(high - (high - low) * min(float(rng.uniform(0, 1)) * strength, 1))
        buf = io.BytesIO()
        # 4:4:4: chroma subsampling would smear the red channel that digitisers read.
        rgb.save(buf, format="JPEG", quality=quality, subsampling=0)
        rgb = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return rgb

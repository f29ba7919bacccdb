"""Raster primitives drawing straight into 8-bit layers: grid, antialiased polylines, text.

A page is two uint8 layers of the same size: ``grid`` (0 = paper, 1-7 = minor line coverage,
8-15 = major line coverage) and ``ink`` (0-15 = coverage by the trace, text and calibration
pulses). The PNG pixel is ``grid << 4 | ink``, an index into a 256-colour palette that blends
paper, grid colour and ink colour. Palette PNGs encode about 5x faster than RGB (DESIGN.md),
and building them is two integer ops per pixel, so encoding dominates the render.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

INK_LEVELS = 15  # ink coverage 0..15 -> 4 bits
MINOR_LEVELS = 7  # grid index 1..7 is minor-line coverage
MAJOR_LEVELS = 8  # grid index 8..15 is major-line coverage


@dataclass(frozen=True)
class Style:
    """Colours (RGB 0-255) and line widths (mm, with a floor in px) of one look."""

    paper: tuple[int, int, int]
    minor: tuple[int, int, int]
    major: tuple[int, int, int]
    ink: tuple[int, int, int]
    minor_width_mm: float
    major_width_mm: float
    min_grid_width_px: tuple[float, float]  # (minor, major)
    trace_width_mm: float
    calibration: bool
    label_size_mm: float


# Clinical paper: pink 1 mm lines, red 5 mm lines, black 0.3 mm trace. Every grid colour keeps
# red at 255, so the red channel alone measures ink: trace_from_image relies on it.
CLINICAL = Style(
    paper=(255, 255, 255),
    minor=(255, 175, 175),
    major=(255, 95, 95),
    ink=(0, 0, 0),
    minor_width_mm=0.1,
    major_width_mm=0.2,
    min_grid_width_px=(0.6, 1.0),
    trace_width_mm=0.3,
    calibration=True,
    label_size_mm=3.2,
)
# ecg_plot 0.2.8 `plot`: matplotlib grid lines of 0.5 pt, minor (1, .7, .7), major pure red,
# trace 0.5 pt in (0, 0, .7), no calibration pulse, 9 pt lead names.
ECG_PLOT = Style(
    paper=(255, 255, 255),
    minor=(255, 179, 179),
    major=(255, 0, 0),
    ink=(0, 0, 179),
    minor_width_mm=0.5 * 25.4 / 72,
    major_width_mm=0.5 * 25.4 / 72,
    min_grid_width_px=(0.5, 0.5),
    trace_width_mm=0.5 * 25.4 / 72,
    calibration=False,
    label_size_mm=9 * 25.4 / 72 * 0.72,
)
STYLES = {"clinical": CLINICAL, "ecg_plot": ECG_PLOT}


def _line_coverage(n_px: int, px_per_mm: float, every_mm: float, width_px: float) -> np.ndarray:
    """Coverage (0-1) of each pixel (spanning [i-0.5, i+0.5]) by lines every ``every_mm``."""
    centres = np.arange(n_px, dtype=np.float64)
    spacing = every_mm * px_per_mm
    k = np.floor(centres / spacing)
    cov = np.zeros(n_px)
    half = width_px / 2
    for line in (k * spacing, (k + 1) * spacing):
        overlap = np.minimum(centres + 0.5, line + half) - np.maximum(centres - 0.5, line - half)
        cov = np.maximum(cov, np.clip(overlap, 0.0, 1.0))
    return cov


@lru_cache(maxsize=16)
def grid_layer(width_px: int, height_px: int, px_per_mm: float, style_name: str) -> np.ndarray:
    """The grid layer for one page size and style, drawn once and cached (read-only)."""
    style = STYLES[style_name]
    minor_w = max(style.minor_width_mm * px_per_mm, style.min_grid_width_px[0])
    major_w = max(style.major_width_mm * px_per_mm, style.min_grid_width_px[1])
    minor = np.maximum.outer(
        _line_coverage(height_px, px_per_mm, 1.0, minor_w),
        _line_coverage(width_px, px_per_mm, 1.0, minor_w),
    )
    major = np.maximum.outer(
        _line_coverage(height_px, px_per_mm, 5.0, major_w),
        _line_coverage(width_px, px_per_mm, 5.0, major_w),
    )
    minor_idx = np.rint(minor * MINOR_LEVELS).astype(np.uint8)
    major_idx = np.rint(major * MAJOR_LEVELS).astype(np.uint8)
    layer = np.where(major_idx > 0, MINOR_LEVELS + major_idx, minor_idx).astype(np.uint8)
    layer.setflags(write=False)
    return layer


def palette(style: Style, paper: tuple[float, float, float] | None = None) -> bytes:
    """The 256-colour palette: index ``g << 4 | a`` is grid level g under ink coverage a."""
    paper_rgb = np.asarray(paper if paper is not None else style.paper, dtype=np.float64)
    # A tinted paper tints the grid lines too (they are printed ink on that paper).
    tint = paper_rgb / 255.0
    minor = np.asarray(style.minor) * tint
    major = np.asarray(style.major) * tint
    grid = np.empty((16, 3))
    grid[0] = paper_rgb
    for g in range(1, MINOR_LEVELS + 1):
        grid[g] = paper_rgb + (minor - paper_rgb) * g / MINOR_LEVELS
    for g in range(1, MAJOR_LEVELS + 1):
        grid[MINOR_LEVELS + g] = paper_rgb + (major - paper_rgb) * g / MAJOR_LEVELS
    alpha = np.arange(16)[None, :, None] / INK_LEVELS
    colours = grid[:, None, :] * (1 - alpha) + np.asarray(style.ink)[None, None, :] * alpha
    return np.rint(colours).clip(0, 255).astype(np.uint8).tobytes()


def draw_polyline(
    ink: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    col_lo: int,
    col_hi: int,
    width_px: float,
) -> None:
    """Draw an antialiased polyline through (xs, ys) into ``ink``, columns [col_lo, col_hi).

    Pixel (row j, column i) spans [i-0.5, i+0.5] x [j-0.5, j+0.5]. For every column the
    polyline's vertical extent is found exactly (its values at both column edges plus every
    vertex inside), widened by the line width, and filled as one vertical span whose end
    pixels get fractional coverage. Lines wider than ~1.5 px are also widened sideways so
    steep strokes keep their width. NaN samples leave a gap. ``xs`` must be non-decreasing.
    """
    height, width = ink.shape
    if xs.size == 0:
        return
    col_lo = max(col_lo, 0, int(np.floor(xs[0] + 0.5)))
    col_hi = min(col_hi, width, int(np.floor(xs[-1] + 0.5)) + 1)
    n = col_hi - col_lo
    if n <= 0:
        return
    edges = np.arange(n + 1, dtype=np.float64) + (col_lo - 0.5)
    at_edges = np.interp(edges, xs, ys)
    lo = np.minimum(at_edges[:-1], at_edges[1:])
    hi = np.maximum(at_edges[:-1], at_edges[1:])
    col = np.floor(xs - (col_lo - 0.5)).astype(np.intp)
    inside = (col >= 0) & (col < n)
    np.minimum.at(lo, col[inside], ys[inside])
    np.maximum.at(hi, col[inside], ys[inside])
    reach = int(round((width_px - 1) / 2))
    if reach > 0:
        lo0, hi0 = lo.copy(), hi.copy()
        for s in range(1, reach + 1):
            lo[s:] = np.fmin(lo[s:], lo0[:-s])
            lo[:-s] = np.fmin(lo[:-s], lo0[s:])
            hi[s:] = np.fmax(hi[s:], hi0[:-s])
            hi[:-s] = np.fmax(hi[:-s], hi0[s:])
    half = width_px / 2
    top, bot = lo - half, hi + half
    ok = np.isfinite(top) & np.isfinite(bot)
    cols = np.flatnonzero(ok)
    top, bot = top[ok], bot[ok]
    first = np.maximum(np.floor(top + 0.5).astype(np.intp), 0)
    last = np.minimum(np.floor(bot + 0.5).astype(np.intp), height - 1)
    keep = last >= first
    cols, top, bot, first, last = cols[keep], top[keep], bot[keep], first[keep], last[keep]
    counts = last - first + 1
    if counts.size == 0:
        return
    span = np.repeat(np.arange(counts.size), counts)
    rows = first[span] + (np.arange(span.size) - np.repeat(np.cumsum(counts) - counts, counts))
    cover = np.minimum(rows + 0.5, bot[span]) - np.maximum(rows - 0.5, top[span])
    level = np.rint(np.clip(cover, 0.0, 1.0) * INK_LEVELS).astype(np.uint8)
    xcols = cols[span] + col_lo
    ink[rows, xcols] = np.maximum(ink[rows, xcols], level)


@lru_cache(maxsize=256)
def text_mask(text: str, size_px: int) -> np.ndarray:
    """Ink levels (0-15) of ``text`` in Pillow's built-in scalable font, cropped tight."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size_px)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    mask = np.rint(np.asarray(canvas, dtype=np.float32) * (INK_LEVELS / 255)).astype(np.uint8)
    mask.setflags(write=False)
    return mask


def draw_text(ink: np.ndarray, text: str, x_px: int, y_top_px: int, size_px: int) -> None:
    """Draw ``text`` with its top-left at (x_px, y_top_px), clipped to the layer."""
    mask = text_mask(text, max(int(size_px), 6))
    height, width = ink.shape
    x0, y0 = max(x_px, 0), max(y_top_px, 0)
    x1, y1 = min(x_px + mask.shape[1], width), min(y_top_px + mask.shape[0], height)
    if x1 <= x0 or y1 <= y0:
        return
    sub = mask[y0 - y_top_px : y1 - y_top_px, x0 - x_px : x1 - x_px]
    np.maximum(ink[y0:y1, x0:x1], sub, out=ink[y0:y1, x0:x1])


class PngError(RuntimeError):
    """The encoder produced bytes that do not read back as the image it was given."""


def encode_png(image: "object") -> bytes:
    """Encode a PIL image as PNG (zlib level 1) and check the bytes read back.

    Raises:
        PngError: if the encoded bytes are not a valid PNG of the same size; a corrupt PNG
            is never returned.
    """
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # type: ignore[attr-defined]
    data = buf.getvalue()
    try:
        with Image.open(io.BytesIO(data)) as check:
            size = check.size
            check.verify()  # chunk CRCs and structure, without decoding pixels
    except Exception as e:  # noqa: BLE001 - any failure here means a corrupt file
        raise PngError(f"PNG encoder produced an unreadable image: {e}") from e
    if size != image.size:  # type: ignore[attr-defined]
        raise PngError(f"PNG encoder wrote size {size}, expected {image.size}")  # type: ignore[attr-defined]
    return data

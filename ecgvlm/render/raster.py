"""Raster primitives drawing straight into 8-bit layers: grid, antialiased polylines, text.

A page is two uint8 layers of the same size: ``grid`` (0 = paper, 1-7 = minor line coverage,
8-15 = major line coverage) and ``ink`` (0-15 = coverage by the trace, text and calibration
pulses). The PNG pixel is ``grid << 4 | ink``, an index into a 256-colour palette that blends
paper, grid colour and ink colour. Palette PNGs encode about 5x faster than RGB (DESIGN.md),
and building them is two integer ops per pixel, so encoding dominates the render.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec

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


@lru_cache(maxsize=16)
def grid_index_layer(width_px: int, height_px: int, px_per_mm: float, style_name: str):
    """``grid_layer(...) << 4``: the grid as the palette index's high nibble, cached, so a
    page is composed with one OR of its ink layer."""
    out = np.left_shift(grid_layer(width_px, height_px, px_per_mm, style_name), 4)
    out.setflags(write=False)
    return out


@lru_cache(maxsize=64)
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


Spans = tuple[np.ndarray, np.ndarray, np.ndarray]  # (column, top, bottom) per column


def polyline_spans(lines: list[tuple[np.ndarray, np.ndarray, int, int]], width_px: float) -> Spans:
    """The vertical ink span, per pixel column, of antialiased polylines.

    Each line is ``(xs, ys, col_lo, col_hi)``: vertices in pixel coordinates (``xs``
    non-decreasing) drawn only in columns [col_lo, col_hi). Pixel (row j, column i) spans
    [i-0.5, i+0.5] x [j-0.5, j+0.5]. In every column a polyline's vertical extent is found
    exactly (its values at both column edges plus every vertex inside) and widened by the
    line width; ``fill_spans`` fills it with fractional coverage at both ends. Lines wider
    than ~1.5 px are also widened sideways so steep strokes keep their width. NaN vertices
    leave a gap.

    All lines are processed in one pass: each is shifted onto its own block of "virtual"
    columns, with empty columns between blocks so no line's interpolation reaches another's
    vertices. One vectorised pass over a page's 13 panels is several times faster than 13.
    """
    shifted_x, all_y, real_cols, virt_cols = [], [], [], []
    next_col, prev_x = 0, -1e9
    for xs, ys, col_lo, col_hi in lines:
        if xs.size == 0:
            continue
        col_lo = max(col_lo, int(np.floor(xs[0] + 0.5)))
        col_hi = min(col_hi, int(np.floor(xs[-1] + 0.5)) + 1)
        if col_hi <= col_lo:
            continue
        start = max(next_col, int(np.ceil(prev_x + 4.0 - xs[0] + col_lo)))
        shift = start - col_lo
        # One pixel of flat extension at both ends: a column edge beyond a line's last
        # vertex then sees that vertex's value, never the next block's.
        shifted_x.append(np.concatenate([[xs[0] - 1.0], xs, [xs[-1] + 1.0]]) + shift)
        all_y.append(np.concatenate([ys[:1], ys, ys[-1:]]))
        real_cols.append(np.arange(col_lo, col_hi))
        virt_cols.append(np.arange(start, start + col_hi - col_lo))
        next_col = start + col_hi - col_lo + 1
        prev_x = xs[-1] + 1.0 + shift
    if not shifted_x:
        return np.zeros(0, dtype=np.intp), np.zeros(0), np.zeros(0)
    xs = np.concatenate(shifted_x)
    ys = np.concatenate(all_y)
    n = next_col
    at_edges = np.interp(np.arange(-0.5, n, 1.0), xs, ys)
    lo = np.minimum(at_edges[:-1], at_edges[1:])
    hi = np.maximum(at_edges[:-1], at_edges[1:])
    col = np.floor(xs + 0.5).astype(np.intp)
    inside = (col >= 0) & (col < n)
    with np.errstate(invalid="ignore"):  # NaN vertices propagate on purpose: they are gaps
        np.minimum.at(lo, col[inside], ys[inside])
        np.maximum.at(hi, col[inside], ys[inside])
    keep = np.concatenate(virt_cols)
    reach = round((width_px - 1) / 2)
    if reach > 0:
        gaps = np.ones(n, dtype=bool)
        gaps[keep] = False
        lo[gaps] = np.nan
        hi[gaps] = np.nan
        lo0, hi0 = lo.copy(), hi.copy()
        for s in range(1, reach + 1):
            lo[s:] = np.fmin(lo[s:], lo0[:-s])
            lo[:-s] = np.fmin(lo[:-s], lo0[s:])
            hi[s:] = np.fmax(hi[s:], hi0[:-s])
            hi[:-s] = np.fmax(hi[:-s], hi0[s:])
    half = width_px / 2
    return np.concatenate(real_cols), lo[keep] - half, hi[keep] + half


def fill_spans(ink: np.ndarray, spans: list[Spans]) -> None:
    """Fill many columns' spans at once (max-combined), clipped to the layer."""
    height, width = ink.shape
    cols = np.concatenate([s[0] for s in spans])
    top = np.concatenate([s[1] for s in spans])
    bot = np.concatenate([s[2] for s in spans])
    first = np.floor(top + 0.5)
    last = np.floor(bot + 0.5)
    ok = np.isfinite(first) & np.isfinite(last) & (cols >= 0) & (cols < width)
    first = np.maximum(first[ok], 0).astype(np.intp)
    last = np.minimum(last[ok], height - 1).astype(np.intp)
    cols, top, bot = cols[ok], top[ok], bot[ok]
    counts = np.maximum(last - first + 1, 0)
    if not counts.any():
        return
    span = np.repeat(np.arange(counts.size), counts)
    rows = first[span] + (np.arange(span.size) - np.repeat(np.cumsum(counts) - counts, counts))
    cover = np.minimum(rows + 0.5, bot[span]) - np.maximum(rows - 0.5, top[span])
    level = (np.clip(cover, 0.0, 1.0) * INK_LEVELS + 0.5).astype(np.uint8)
    # ufunc.at, not fancy assignment: overlapping leads share pixels and must max-combine.
    np.maximum.at(ink.reshape(-1), rows * width + cols[span], level)


def draw_polyline(
    ink: np.ndarray, xs: np.ndarray, ys: np.ndarray, col_lo: int, col_hi: int, width_px: float
) -> None:
    """Draw one antialiased polyline into ``ink`` (see ``polyline_spans``)."""
    fill_spans(ink, [polyline_spans([(xs, ys, col_lo, col_hi)], width_px)])


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


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _zlib_level1(raw: bytes | memoryview) -> bytes:
    """A zlib stream at level 1: libdeflate when installed (about 2x faster), else zlib."""
    if _HAS_LIBDEFLATE:
        import deflate

        return deflate.zlib_compress(raw, 1)
    return zlib.compress(raw, 1)


def _adler32(raw: bytes | memoryview) -> int:
    if _HAS_LIBDEFLATE:
        import deflate

        return deflate.adler32(raw)
    return zlib.adler32(raw)


_HAS_LIBDEFLATE = find_spec("deflate") is not None


def palette_rows(height: int, width: int) -> np.ndarray:
    """A (height, width + 1) uint8 buffer for ``encode_palette_png``: column 0 holds each
    scanline's PNG filter byte (0, none), ``[:, 1:]`` the palette indices."""
    return np.zeros((height, width + 1), dtype=np.uint8)


def encode_palette_png(rows: np.ndarray, palette_rgb: bytes) -> bytes:
    """Write an 8-bit palette PNG from ``palette_rows`` scanlines, and check it reads back.

    Writing the chunks here (rather than through Pillow) lets the one expensive step, the
    deflate, run in libdeflate. Filter "none" suits palette images: the grid repeats
    exactly, so deflate finds long matches without help.

    Raises:
        PngError: if the bytes do not read back as a PNG of this size.
    """
    return _encode_png(rows, rows.shape[1] - 1, 3, palette_rgb)


def encode_rgb_png(rgb: np.ndarray) -> bytes:
    """Write an (height, width, 3) uint8 array (an augmented page) as an RGB PNG, checked.

    As ``encode_palette_png``: filter "none" and libdeflate at level 1. On the augmented
    pages (noise, blur, rotation, JPEG) that is 5-7x faster than Pillow's encoder, whose
    per-row adaptive filters buy nothing here (they made the noisy page 15% larger).

    Raises:
        PngError: if the bytes do not read back as a PNG of this size.
    """
    height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise PngError(f"encode_rgb_png takes (height, width, 3) uint8, got {rgb.shape} {rgb.dtype}")
    rows = np.empty((height, width * 3 + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter byte: none
    rows[:, 1:] = rgb.reshape(height, width * 3)
    return _encode_png(rows, width, 2)


def _encode_png(rows: np.ndarray, width: int, color_type: int, palette_rgb: bytes = b"") -> bytes:
    """The PNG of ``rows`` (scanlines, each led by its filter byte) in 8-bit ``color_type``
    (2: RGB, 3: palette)."""
    height = rows.shape[0]
    raw = memoryview(np.ascontiguousarray(rows)).cast("B")  # no copy of the scanlines
    compressed = _zlib_level1(raw)
    # The zlib trailer is the Adler-32 of what the compressor was given: checking it costs
    # a fraction of a millisecond, unlike inflating the whole stream again.
    if compressed[-4:] != struct.pack(">I", _adler32(raw)):
        raise PngError("PNG encoder: the compressed scanlines do not match the image")
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    chunks = [PNG_SIGNATURE, _chunk(b"IHDR", header)]
    if palette_rgb:
        chunks.append(_chunk(b"PLTE", palette_rgb))
    chunks += [_chunk(b"IDAT", compressed), _chunk(b"IEND", b"")]
    data = b"".join(chunks)
    _check_png(data, (width, height))
    return data


def _check_png(data: bytes, size: tuple[int, int]) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as check:
            read_size = check.size
            check.verify()  # chunk CRCs and structure, without decoding pixels
    except Exception as e:
        raise PngError(f"PNG encoder produced an unreadable image: {e}") from e
    if read_size != size:
        raise PngError(f"PNG encoder wrote size {read_size}, expected {size}")

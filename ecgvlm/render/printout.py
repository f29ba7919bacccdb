"""``render_printout``: EcgRecord -> Printout (palette PNG + the geometry of every lead)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecgvlm.records import EcgRecord, Panel, Printout
from ecgvlm.render import raster
from ecgvlm.render.config import (
    MARGIN_BOTTOM_MM,
    MARGIN_TOP_MM,
    MARGIN_X_MM,
    RenderConfig,
)

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# Lead grid of each layout: rows of cells, each cell one lead drawn over 1/len(row) of the
# trace width (and so of the time); cells in one column show the same time span.
LAYOUT_ROWS: dict[str, tuple[tuple[str, ...], ...]] = {
    "3x4+II": (
        ("I", "aVR", "V1", "V4"),
        ("II", "aVL", "V2", "V5"),
        ("III", "aVF", "V3", "V6"),
        ("<rhythm>",),
    ),
    "6x2": tuple(zip(STANDARD_LEADS[:6], STANDARD_LEADS[6:])),
    "12x1": tuple((lead,) for lead in STANDARD_LEADS),
}
MAX_STRIP_LEADS = 4
SEPARATOR_HALF_MM = 3.0  # half-height of the tick marking a lead change within a row
CALIBRATION_S = (0.08, 0.2, 0.08)  # flat, 1 mV plateau, flat: the classic pulse


class RenderError(ValueError):
    """A record that cannot be drawn with the requested layout (the message says why)."""


@dataclass(frozen=True)
class _Cell:
    lead: str
    lead_index: int
    column: int
    n_columns: int


def _lead_lookup(record: EcgRecord) -> dict[str, int]:
    """Map lead names case-insensitively ("avr" -> aVR) to signal columns."""
    return {name.lower(): i for i, name in enumerate(record.leads)}


def resolve_layout(record: EcgRecord, config: RenderConfig) -> str:
    """The concrete layout for ``record`` (``auto`` picks 3x4+II or strip)."""
    if config.layout != "auto":
        return config.layout
    lookup = _lead_lookup(record)
    if all(lead.lower() in lookup for lead in STANDARD_LEADS):
        return "3x4+II"
    return "strip"


def _plan_rows(record: EcgRecord, config: RenderConfig, layout: str) -> list[list[_Cell]]:
    lookup = _lead_lookup(record)
    if layout == "strip":
        if record.signal_mv.shape[1] > MAX_STRIP_LEADS:
            raise RenderError(
                f"{record.record_id}: layout 'strip' draws up to {MAX_STRIP_LEADS} leads, "
                f"record has {record.signal_mv.shape[1]}; use 3x4+II, 6x2 or 12x1"
            )
        return [[_Cell(name, i, 0, 1)] for i, name in enumerate(record.leads)]
    rows: list[list[_Cell]] = []
    missing: list[str] = []
    for names in LAYOUT_ROWS[layout]:
        row = []
        for c, name in enumerate(names):
            name = config.rhythm_lead if name == "<rhythm>" else name
            index = lookup.get(name.lower())
            if index is None:
                missing.append(name)
                continue
            row.append(_Cell(name, index, c, len(names)))
        rows.append(row)
    if missing and config.missing_leads == "error":
        raise RenderError(
            f"{record.record_id}: layout {layout!r} needs lead(s) {', '.join(missing)}, "
            f"record has {list(record.leads)} (missing_leads='skip' draws the rest, "
            f"layout 'strip' draws 1-{MAX_STRIP_LEADS} leads as they are)"
        )
    return rows


def _calibration_polyline(x_end_px: float, baseline_px: float, config: RenderConfig):
    px_per_s = config.px_per_mm * config.paper_speed_mm_s
    pulse_px = config.px_per_mm * config.mm_per_mv  # 1 mV
    flat, plateau, tail = (s * px_per_s for s in CALIBRATION_S)
    x0 = x_end_px - (flat + plateau + tail)
    xs = np.array([x0, x0 + flat, x0 + flat, x0 + flat + plateau, x0 + flat + plateau, x_end_px])
    ys = np.array([0, 0, -pulse_px, -pulse_px, 0, 0]) + baseline_px
    return xs, ys


def draw_page(
    record: EcgRecord,
    config: RenderConfig,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[Panel, ...], str]:
    """Draw the grid and ink layers of a page; no augmentation beyond baseline wander.

    Returns:
        (grid, ink, panels, layout): the grid layer (shared, read-only, from the cache), the
        ink layer, one Panel per drawn lead, and the resolved layout name.
    """
    from ecgvlm.render.augment import baseline_wander

    layout = resolve_layout(record, config)
    rows = _plan_rows(record, config, layout)
    style = raster.STYLES[config.style]
    px_per_mm = config.px_per_mm
    px_per_s = px_per_mm * config.paper_speed_mm_s
    px_per_mv = px_per_mm * config.mm_per_mv
    page_w_mm, page_h_mm = config.page_size_mm(layout)
    width_px, height_px = round(page_w_mm * px_per_mm), round(page_h_mm * px_per_mm)
    grid = raster.grid_layer(width_px, height_px, px_per_mm, config.style)
    ink = np.zeros((height_px, width_px), dtype=np.uint8)

    trace_w_mm = page_w_mm - 2 * MARGIN_X_MM
    page_s = trace_w_mm / config.paper_speed_mm_s
    pitch_mm = (page_h_mm - MARGIN_TOP_MM - MARGIN_BOTTOM_MM) / len(rows)
    line_px = (config.line_width_mm or style.trace_width_mm) * px_per_mm
    label_px = round(style.label_size_mm * px_per_mm)
    fs = record.fs_hz
    n_samples = record.n_samples
    wander = (
        baseline_wander(record.signal_mv.shape, fs, rng, config.augment_strength)
        if rng is not None and "baseline_wander" in config.augmentations()
        else None
    )

    panels: list[Panel] = []
    lines: list[tuple[np.ndarray, np.ndarray, int, int]] = []
    spans: list[raster.Spans] = []
    for r, row in enumerate(rows):
        # Row centres sit on whole millimetres so baselines align with the grid.
        centre_px = round(MARGIN_TOP_MM + pitch_mm * (r + 0.5)) * px_per_mm
        band_y0 = round((MARGIN_TOP_MM + pitch_mm * r) * px_per_mm)
        band_y1 = round((MARGIN_TOP_MM + pitch_mm * (r + 1)) * px_per_mm)
        trace_x0_px = MARGIN_X_MM * px_per_mm
        if style.calibration:
            xs, ys = _calibration_polyline(trace_x0_px - 2 * px_per_mm, centre_px, config)
            lines.append((xs, ys, 0, width_px))
        for cell in row:
            x0 = round((MARGIN_X_MM + trace_w_mm * cell.column / cell.n_columns) * px_per_mm)
            x1 = round((MARGIN_X_MM + trace_w_mm * (cell.column + 1) / cell.n_columns) * px_per_mm)
            t_start = page_s * cell.column / cell.n_columns
            t_end = min(t_start + (x1 - x0) / px_per_s, record.duration_s)
            if t_end <= t_start:
                continue  # the record ends before this cell starts
            # One sample either side so the polyline reaches the panel's edge columns.
            i0 = max(int(np.floor(t_start * fs)) - 1, 0)
            i1 = min(int(np.ceil(t_end * fs)) + 2, n_samples)
            values = record.signal_mv[i0:i1, cell.lead_index].astype(np.float64)
            if wander is not None:
                values = values + wander[i0:i1, cell.lead_index]
            offset_mv = _median_mv(values, t_start * fs - i0, t_end * fs - i0)
            offset_mv = offset_mv if config.center_leads else 0.0
            baseline_px = centre_px + offset_mv * px_per_mv
            xs = x0 + (np.arange(i0, i1) / fs - t_start) * px_per_s
            ys = baseline_px - values * px_per_mv
            if config.clip_to_panel:
                ys = np.clip(ys, band_y0, band_y1 - 1)
            lines.append((xs, ys, x0, x1))
            if cell.column > 0:
                half = SEPARATOR_HALF_MM * px_per_mm
                spans.append(
                    (np.array([x0]), np.array([centre_px - half]), np.array([centre_px + half]))
                )
            _draw_label(ink, cell.lead, x0, centre_px, pitch_mm, label_px, config)
            panels.append(
                Panel(
                    lead=cell.lead,
                    box_px=(x0, band_y0, x1, band_y1),
                    baseline_y_px=float(baseline_px),
                    t_start_s=float(t_start),
                    t_end_s=float(t_end),
                    px_per_mm=px_per_mm,
                    paper_speed_mm_s=float(config.paper_speed_mm_s),
                    mm_per_mv=float(config.mm_per_mv),
                )
            )
    spans.append(raster.polyline_spans(lines, line_px))
    raster.fill_spans(ink, spans)
    if config.caption:
        text = f"{config.paper_speed_mm_s:g} mm/s   {config.mm_per_mv:g} mm/mV"
        raster.draw_text(ink, text, round(MARGIN_X_MM * px_per_mm), round(2 * px_per_mm), label_px)
    return grid, ink, tuple(panels), layout


def _median_mv(values: np.ndarray, first: float, stop: float) -> float:
    """Median of the samples with index in [first, stop) (relative), ignoring NaN; 0 if none."""
    shown = values[max(int(np.ceil(first)), 0) : max(int(np.ceil(stop)), 0)]
    if not np.isfinite(shown).all():
        shown = shown[np.isfinite(shown)]
    if shown.size == 0:
        return 0.0
    # The upper median via one partition: np.median's checks cost more than the sort here.
    k = shown.size // 2
    return float(np.partition(shown, k)[k])


def _draw_label(ink, lead, x0, centre_px, pitch_mm, label_px, config) -> None:
    px_per_mm = config.px_per_mm
    if config.style == "ecg_plot":
        # ecg_plot writes the name 0.07 s after the column start, its text baseline 0.5 mV
        # below the trace's zero line.
        x = x0 + round(0.07 * config.paper_speed_mm_s * px_per_mm)
        y_top = round(centre_px + 0.5 * config.mm_per_mv * px_per_mm) - label_px
    else:
        x = x0 + round(1.0 * px_per_mm)
        y_top = round(centre_px - 0.45 * pitch_mm * px_per_mm)
    raster.draw_text(ink, lead, x, y_top, label_px)


def render_printout(
    record: EcgRecord, config: RenderConfig | None = None, *, seed: int = 0
) -> Printout:
    """Draw ``record`` as a printout PNG and report where every lead is.

    Shows the first ``(page width - 50 mm) / paper_speed_mm_s`` seconds (10 s by default);
    shorter records leave the rest of each row blank; NaN stretches are drawn as gaps; any
    sampling rate works (samples are placed at their true times). See ``RenderConfig`` for
    layouts, amplitude clipping and augmentations.

    Args:
        record: The ECG, in millivolts.
        config: How to draw it; ``RenderConfig()`` when None.
        seed: Seeds the augmentations (ignored when ``config.augment`` is off).

    Returns:
        A Printout whose panels map pixels back to (lead, seconds, millivolts). After a
        ``rotation`` augmentation the geometry is approximate: ``geometry_exact`` is False.

    Raises:
        RenderError: if the layout needs leads the record lacks (``missing_leads="error"``)
            or the record has too many leads for a strip.
    """
    from PIL import Image

    from ecgvlm.render.augment import IMAGE_AUGMENTATIONS, apply_image_augmentations

    config = config or RenderConfig()
    names = config.augmentations()
    rng = np.random.default_rng(seed) if names else None
    grid, ink, panels, layout = draw_page(record, config, rng)
    style = raster.STYLES[config.style]
    paper = None
    height_px, width_px = ink.shape
    if rng is not None and "grid_dropout" in names:
        from ecgvlm.render.augment import grid_dropout

        grid_high = np.left_shift(grid_dropout(grid, rng, config.augment_strength), 4)
    else:
        grid_high = raster.grid_index_layer(width_px, height_px, config.px_per_mm, config.style)
    if rng is not None and "tint" in names:
        from ecgvlm.render.augment import paper_tint

        paper = paper_tint(rng, config.augment_strength)
    palette = raster.palette(style, paper)
    rows = raster.palette_rows(height_px, width_px)
    index = rows[:, 1:]
    np.bitwise_or(grid_high, ink, out=index)
    size_px = (width_px, height_px)
    if any(name in IMAGE_AUGMENTATIONS for name in names):
        image = Image.fromarray(index)
        image.putpalette(palette)
        paper_rgb = tuple(round(v) for v in (paper or style.paper))
        image = apply_image_augmentations(image, names, rng, config.augment_strength, paper_rgb)
        png = raster.encode_rgb_png(np.asarray(image.convert("RGB")))
    else:
        png = raster.encode_palette_png(rows, palette)
    return Printout(
        png=png,
        size_px=size_px,
        px_per_mm=config.px_per_mm,
        panels=panels,
        layout=layout,
        augmentations=names,
        geometry_exact="rotation" not in names,
    )


def blank_printout(
    leads: tuple[str, ...], config: RenderConfig | None = None, fs_hz: float = 500.0,
    duration_s: float = 10.0,
) -> Printout:
    """The page a record with these leads would be printed on, with no trace: the same
    layout, grid, lead labels, calibration pulses and caption, every sample missing (NaN is
    drawn as a gap). The evaluation's ``blank`` control asks a model about this page."""
    from ecgvlm.records import EcgRecord

    n_samples = max(1, round(fs_hz * duration_s))
    record = EcgRecord(record_id="blank/page", dataset="blank",
                       signal_mv=np.full((n_samples, len(leads)), np.nan, dtype=np.float32),
                       fs_hz=fs_hz, leads=tuple(leads))
    return render_printout(record, config)

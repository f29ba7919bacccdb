"""Faithfulness: every panel of every real 12-lead record digitises back to its source.

For each panel, ``trace_from_image`` reads the drawn trace back; the source lead, resampled
to the panel's pixel columns, must correlate with it at Pearson r >= 0.98 wherever the lead
spans >= 0.2 mV. Columns whose pixels cannot say which lead they belong to are left out
(they say nothing about the renderer's accuracy):

- columns where another lead's trace (computed from its own source and panel geometry, not
  from the image) comes within a few pixels of this one, in this or a nearby column: leads
  larger than their row's band overlap their neighbours, as on clinical paper;
- the first column of panels after a lead change, which carries the change marker;
- columns where the whole trace is off the page, or beyond the rows the digitiser searches
  (its band and one band above and below). Elsewhere the source is clipped to those rows.

The sweep renders at the default dpi only, to stay well under a minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecgvlm.records import EcgRecord, Panel, Printout
from ecgvlm.render import STANDARD_LEADS, RenderConfig, render_printout, trace_from_image
from ecgvlm.render.digitise import search_rows
from ecgvlm.signal import find_record_paths, read_record

MIN_R = 0.98
MIN_SPAN_MV = 0.2
NEAR_PX = 3.0  # another lead within this many pixels (and columns) makes a column ambiguous
NEAR_COLUMNS = 2


def _source_extent(
    record: EcgRecord, panel: Panel, width_px: int, height_px: int
) -> tuple[np.ndarray, ...]:
    """Per page column: the source resampled to the column, and its top and bottom rows.

    A column's value is the middle of the source's range over the column's time span: what
    one column of a min/max-drawn trace can show (a point sample at the column centre
    would differ by up to half the range within the column, in fast or noisy stretches).
    """
    signal = record.lead(panel.lead).astype(np.float64)
    t = np.arange(record.n_samples) / record.fs_hz
    x0, _, x1, _ = panel.box_px
    cols = np.arange(x0, x1)
    t_col = panel.t_start_s + (cols - x0) / panel.px_per_s
    shown = (t_col <= panel.t_end_s) & (t_col <= t[-1])
    edges = panel.t_start_s + (np.arange(x0, x1 + 1) - x0 - 0.5) / panel.px_per_s
    at_edges = np.interp(edges, t, signal)
    lo_mv = np.minimum(at_edges[:-1], at_edges[1:])
    hi_mv = np.maximum(at_edges[:-1], at_edges[1:])
    k = np.floor((t - panel.t_start_s) * panel.px_per_s + 0.5).astype(int)
    inside = (k >= 0) & (k < x1 - x0)
    np.minimum.at(lo_mv, k[inside], signal[inside])
    np.maximum.at(hi_mv, k[inside], signal[inside])
    # The digitiser sees only its search rows (the page stops ink, the search window stops
    # the digitiser): the source is clipped to them the same way.
    first_row, stop_row = search_rows(panel, height_px)
    page_lo_mv = (panel.baseline_y_px - (stop_row - 1)) / panel.px_per_mv
    page_hi_mv = (panel.baseline_y_px - first_row) / panel.px_per_mv
    raw_lo, raw_hi = lo_mv, hi_mv
    lo_mv = np.clip(lo_mv, page_lo_mv, page_hi_mv)
    hi_mv = np.clip(hi_mv, page_lo_mv, page_hi_mv)
    value = np.where(shown, (lo_mv + hi_mv) / 2, np.nan)
    top = np.full(width_px, np.nan)
    bottom = np.full(width_px, np.nan)
    top[x0:x1] = np.where(shown, panel.baseline_y_px - raw_hi * panel.px_per_mv, np.nan)
    bottom[x0:x1] = np.where(shown, panel.baseline_y_px - raw_lo * panel.px_per_mv, np.nan)
    return value, top, bottom


def ambiguous_columns(printout: Printout, extents: list) -> np.ndarray:
    """(panels, page columns): where each panel's ink cannot be told apart (module docstring)."""
    width, height = printout.size_px
    top = np.stack([e[1] for e in extents])
    bottom = np.stack([e[2] for e in extents])
    n = len(extents)
    ambiguous = np.zeros((n, width), dtype=bool)
    # A lead-change marker is drawn in the first column of every later column's panels.
    ambiguous[:, [p.box_px[0] for p in printout.panels if p.t_start_s > 0]] = True
    # Columns where the whole trace is off the page (or the search rows) show nothing of it.
    for i, panel in enumerate(printout.panels):
        first_row, stop_row = search_rows(panel, height)
        ambiguous[i] |= (bottom[i] < first_row) | (top[i] > stop_row - 1)
    # Traces that touch diagonally (in nearby columns) are as ambiguous as overlapping ones,
    # and a digitiser that met another trace needs a few columns to be sure it left it.
    touching = np.zeros((n, width), dtype=bool)
    others = ~np.eye(n, dtype=bool)[:, :, None]
    for shift in range(-NEAR_COLUMNS, NEAR_COLUMNS + 1):
        other_top = np.roll(top, shift, axis=1)[None, :, :]
        other_bottom = np.roll(bottom, shift, axis=1)[None, :, :]
        near = (other_top <= bottom[:, None, :] + NEAR_PX) & (
            other_bottom >= top[:, None, :] - NEAR_PX
        )
        touching |= (near & others).any(axis=1)
    for shift in range(-NEAR_COLUMNS, NEAR_COLUMNS + 1):
        ambiguous |= np.roll(touching, shift, axis=1)
    return ambiguous


def panel_correlations(record: EcgRecord, printout: Printout) -> list[tuple[str, float, float]]:
    """(lead, t_start_s, r) for every panel whose lead spans >= MIN_SPAN_MV."""
    width, height = printout.size_px
    extents = [_source_extent(record, p, width, height) for p in printout.panels]
    ambiguous = ambiguous_columns(printout, extents)
    out = []
    for i, panel in enumerate(printout.panels):
        source = extents[i][0]
        finite = np.isfinite(source)
        if not finite.any() or np.ptp(source[finite]) < MIN_SPAN_MV:
            continue
        x0, _, x1, _ = panel.box_px
        _, mv = trace_from_image(printout.png, panel)
        keep = finite & np.isfinite(mv) & ~ambiguous[i, x0:x1]
        name = f"{record.record_id} {panel.lead}@{panel.t_start_s:g}s"
        assert keep.mean() > 0.5, f"{name}: only {keep.mean():.0%} of columns are clear"
        r = float(np.corrcoef(mv[keep], source[keep])[0, 1])
        out.append((panel.lead, panel.t_start_s, r))
    return out


def _twelve_lead_paths(root: Path) -> list[Path]:
    paths = []
    for path in find_record_paths(root):
        header = Path(f"{path}.hea")
        if header.is_file():
            n_sig = int(header.read_text().split()[1])
            if n_sig >= 12:
                paths.append(path)
    return paths


def _check_records(root: Path) -> int:
    paths = _twelve_lead_paths(root)
    assert paths, f"no 12-lead records under {root}"
    failures = []
    for path in paths:
        record = read_record(path)
        leads = [lead for lead in STANDARD_LEADS if lead in record.leads]
        assert len(leads) == 12, f"{path}: standard leads {leads}"
        printout = render_printout(record, RenderConfig())
        for lead, t_start, r in panel_correlations(record, printout):
            if not r >= MIN_R:
                failures.append(f"{record.record_id} {lead}@{t_start:g}s r={r:.3f}")
    assert not failures, f"{len(failures)} panels below r={MIN_R}: {failures[:20]}"
    return len(paths)


def test_faithful_on_repo_samples(samples_dir):
    assert _check_records(samples_dir) >= 10


def test_faithful_on_shared_records(shared_ecg_dir):
    assert _check_records(shared_ecg_dir) >= 50

"""``trace_from_image``: read one panel of a printout back into a signal.

Ink darkness is measured on the red channel: every grid colour of both styles keeps red at
255, so ``1 - R/255`` is the ink coverage alone (exactly so for un-augmented pages). Each
pixel column of the panel is split into runs of dark pixels; starting from the run nearest
the baseline, the trace is followed column by column through the run that touches (or is
nearest to) the previous one, which steps over lead labels and over neighbouring leads that
overflow into the row. A column's value is the darkness-weighted centre of its run.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from ecgvlm.records import Panel

DARK_THRESHOLD = 0.3


@lru_cache(maxsize=2)
def _darkness(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        red = np.asarray(image.convert("RGB"))[:, :, 0]
    dark = 1.0 - red.astype(np.float32) / 255.0
    dark.setflags(write=False)
    return dark


def trace_from_image(
    png: bytes, panel: Panel, *, threshold: float = DARK_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """Digitise ``panel`` of a printout PNG back to (seconds, millivolts).

    The whole page height is searched, so amplitudes that overflow the panel's band are read
    too. Columns where no ink is found are NaN.

    Args:
        png: The printout's PNG bytes.
        panel: One of the printout's panels.
        threshold: Darkness (0-1) above which a pixel counts as ink.

    Returns:
        ``(t_s, mv)``: one value per pixel column of the panel, ``t_s`` the time shown at the
        column's centre.
    """
    dark = _darkness(png)
    x0, _, x1, _ = panel.box_px
    cols = dark[:, x0:x1].T  # (columns, rows): row runs become contiguous
    n_cols, n_rows = cols.shape
    mask = cols > threshold
    edges = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)
    run_col, run_start = np.nonzero(edges == 1)
    _, run_stop = np.nonzero(edges == -1)  # same order: row-major over (column, row)
    # Darkness-weighted centre of every run, from per-column cumulative sums.
    rows = np.arange(n_rows, dtype=np.float64)
    weight = np.concatenate([np.zeros((n_cols, 1)), np.cumsum(cols, axis=1)], axis=1)
    moment = np.concatenate([np.zeros((n_cols, 1)), np.cumsum(cols * rows, axis=1)], axis=1)
    mass = weight[run_col, run_stop] - weight[run_col, run_start]
    centre = (moment[run_col, run_stop] - moment[run_col, run_start]) / np.maximum(mass, 1e-9)

    y = np.full(n_cols, np.nan)
    bounds = np.searchsorted(run_col, np.arange(n_cols + 1))
    prev_lo = prev_hi = prev_c = panel.baseline_y_px
    for c in range(n_cols):
        a, b = bounds[c], bounds[c + 1]
        if a == b:
            continue
        lo, hi, ce = run_start[a:b], run_stop[a:b] - 1, centre[a:b]
        # Distance between the run and the previous column's run (0 when they touch).
        gap = np.maximum(np.maximum(lo - prev_hi - 1, prev_lo - hi - 1), 0)
        best = int(np.lexsort((np.abs(ce - prev_c), gap))[0])
        y[c] = ce[best]
        prev_lo, prev_hi, prev_c = lo[best], hi[best], ce[best]
    t_s = panel.t_start_s + np.arange(n_cols) / panel.px_per_s
    mv = (panel.baseline_y_px - y) / panel.px_per_mv
    return t_s, mv

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
# Path costs, in pixels: a jump between runs of neighbouring columns costs its gap (0 when
# they touch) plus JUMP_WEIGHT x the change of centre; every column costs BASELINE_WEIGHT x
# the distance from the panel's baseline. A trace that crosses this one for a few columns
# cannot pull the path away, since staying on it costs the distance to its own baseline in
# every column while the true trace returns to ours.
JUMP_WEIGHT = 0.05
BASELINE_WEIGHT = 0.05


def _best_path(lo, hi, centre, bounds, baseline_px) -> list[tuple[int, int]]:
    """Viterbi over the ink runs of each column: the cheapest left-to-right path.

    ``lo``/``hi`` are each run's first and last row, ``bounds[c]:bounds[c + 1]`` the runs of
    column c. Returns (column, run index) for every column that has ink.
    """
    columns = [c for c in range(len(bounds) - 1) if bounds[c + 1] > bounds[c]]
    if not columns:
        return []
    lo, hi, centre = lo.astype(np.float64), hi.astype(np.float64), centre.astype(np.float64)
    unary = BASELINE_WEIGHT * np.abs(centre - baseline_px)
    backs: list[np.ndarray] = []
    prev = np.arange(bounds[columns[0]], bounds[columns[0] + 1])
    cost = unary[prev]
    for c in columns[1:]:
        cur = np.arange(bounds[c], bounds[c + 1])
        if prev.size == 1 and cur.size == 1:  # the common case, without matrices
            backs.append(prev)
            cost = cost + unary[cur]
            prev = cur
            continue
        gap = np.maximum(lo[cur][None, :] - hi[prev][:, None], lo[prev][:, None] - hi[cur][None, :])
        step = np.maximum(gap - 1, 0) + JUMP_WEIGHT * np.abs(centre[cur][None, :] - centre[prev][:, None])
        total = cost[:, None] + step
        back = np.argmin(total, axis=0)
        cost = total[back, np.arange(cur.size)] + unary[cur]
        backs.append(prev[back])
        prev = cur
    k = int(prev[np.argmin(cost)])
    path = [(columns[-1], k)]
    for j in range(len(columns) - 2, -1, -1):
        k = int(backs[j][k - bounds[columns[j + 1]]])
        path.append((columns[j], k))
    path.reverse()
    return path


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
    chosen = _best_path(run_start, run_stop - 1, centre, bounds, panel.baseline_y_px)
    for c, k in chosen:
        y[c] = centre[k]
    t_s = panel.t_start_s + np.arange(n_cols) / panel.px_per_s
    mv = (panel.baseline_y_px - y) / panel.px_per_mv
    return t_s, mv

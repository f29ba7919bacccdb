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
# Path costs, in pixels. Stepping from run k (previous column) to run j costs the distance
# from the nearer end of k to j (0 when j contains or touches that end), plus JUMP_WEIGHT x
# the change of centre, plus BASELINE_WEIGHT x j's distance from the panel's baseline. A
# stroke leaves a column at one end of its run, so a steep stroke continues from its tip and
# not into a label or another lead that merely touches the middle of it; the baseline term
# keeps the path from following a crossing lead away from this panel's row.
JUMP_WEIGHT = 0.05
BASELINE_WEIGHT = 0.05
END_WEIGHT = 0.3
# Paths costing this much more than the best one so far are dropped (beam search): other
# leads' traces sit a row away and fall out within a few columns, which keeps the search
# about linear in the number of columns.
BEAM = 60.0
# Every column also offers "no ink of this lead here" (a NaN gap, or the record ended): it
# costs NONE_COST per column plus NONE_ENTRY to enter, more than following a trace near this
# row, less than following another lead a row away (which costs ~BASELINE_WEIGHT x a row).
NONE_COST = 6.0
NONE_ENTRY = 10.0
NONE_ROW = -(10**6)  # geometry of a none state that has not yet seen ink


def _best_path(lo, hi, centre, unary, is_none, bounds) -> list[int]:
    """Viterbi over the ink runs of each column: the cheapest left-to-right path.

    ``lo``/``hi`` are each run's first and last row (``NONE_ROW`` for none states),
    ``unary`` its own cost, ``is_none`` marks each column's "no ink of this lead here" state, ``bounds[c]:bounds[c + 1]`` the
    runs of column c (every column has at least its none state). Returns the run index
    chosen in every column. Plain Python: a column holds a handful of runs, too few for
    numpy to pay off.
    """
    lo, hi, centre, unary = lo.tolist(), hi.tolist(), centre.tolist(), unary.tolist()
    is_none, bounds = is_none.tolist(), bounds.tolist()
    n_cols = len(bounds) - 1
    backs: list[list[int]] = []
    prev = list(range(bounds[0], bounds[1]))
    cost = [unary[k] for k in prev]
    for c in range(1, n_cols):
        cur = range(bounds[c], bounds[c + 1])
        new_cost, back = [], []
        for j in cur:
            lo_j, hi_j, c_j, none_j = lo[j], hi[j], centre[j], is_none[j]
            best, best_k = float("inf"), 0
            for i, k in enumerate(prev):
                if none_j:
                    step = 0.0 if is_none[k] else NONE_ENTRY
                elif lo[k] == NONE_ROW:
                    step = 0.0  # a none state that has never seen ink (panel start)
                else:
                    lo_k, hi_k = lo[k], hi[k]
                    gap = max(lo_j - hi_k - 1, lo_k - hi_j - 1, 0)
                    to_top = max(lo_j - lo_k - 1, lo_k - hi_j - 1, 0)
                    to_bottom = max(lo_j - hi_k - 1, hi_k - hi_j - 1, 0)
                    step = (
                        gap
                        + END_WEIGHT * min(to_top, to_bottom)
                        + JUMP_WEIGHT * abs(c_j - centre[k])
                    )
                if cost[i] + step < best:
                    best, best_k = cost[i] + step, k
            back.append(best_k)
            new_cost.append(best + unary[j])
            if none_j:
                # The none state remembers where the trace was last seen, so that leaving
                # it costs the same jump as if the trace had been continuous.
                lo[j], hi[j], centre[j] = lo[best_k], hi[best_k], centre[best_k]
        backs.append(back)
        cutoff = min(new_cost) + BEAM
        prev = [j for j, v in zip(cur, new_cost) if v <= cutoff]
        cost = [v for v in new_cost if v <= cutoff]
    k = prev[min(range(len(prev)), key=cost.__getitem__)]
    path = [k]
    for c in range(n_cols - 2, -1, -1):
        k = backs[c][k - bounds[c + 1]]
        path.append(k)
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


def search_rows(panel: Panel, page_height_px: int) -> tuple[int, int]:
    """Rows [first, stop) that ``trace_from_image`` searches: the panel's band and one band
    height above and below it (+-1.5 rows' pitch from the row centre), within the page."""
    _, y0, _, y1 = panel.box_px
    return max(y0 - (y1 - y0), 0), min(y1 + (y1 - y0), page_height_px)


def trace_from_image(
    png: bytes, panel: Panel, *, threshold: float = DARK_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """Digitise ``panel`` of a printout PNG back to (seconds, millivolts).

    The rows given by ``search_rows`` are searched, so amplitudes that overflow the panel's
    band into the neighbouring rows are read too; ink beyond them counts as off the page.
    Columns where no ink is found, or where the trace is off the searched rows, are NaN.

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
    first_row, stop_row = search_rows(panel, dark.shape[0])
    cols = dark[first_row:stop_row, x0:x1].T  # (columns, rows): row runs become contiguous
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

    run_last = run_stop - 1
    # Where the trace touches the top or bottom of the searched rows anywhere in the panel,
    # every column gets a virtual run just beyond that edge, so the path can wait there
    # (reading NaN) while the trace is out of sight instead of jumping to another lead.
    virtual = [
        row
        for row, touched in ((-1, (run_start == 0).any()), (n_rows, (run_last == n_rows - 1).any()))
        if touched
    ]
    # Kinds of state: 0 a real run, 1 beyond the searched rows, 2 no ink of this lead.
    kinds = [np.zeros(run_col.size, dtype=np.int8)]
    for row, kind_id in [(row, 1) for row in virtual] + [(NONE_ROW, 2)]:
        run_col = np.concatenate([run_col, np.arange(n_cols)])
        run_start = np.concatenate([run_start, np.full(n_cols, row)])
        run_last = np.concatenate([run_last, np.full(n_cols, row)])
        centre = np.concatenate([centre, np.full(n_cols, float(row))])
        kinds.append(np.full(n_cols, kind_id, dtype=np.int8))
    kind = np.concatenate(kinds)
    order = np.argsort(run_col, kind="stable")
    run_col, run_start, run_last, centre, kind = (
        run_col[order],
        run_start[order],
        run_last[order],
        centre[order],
        kind[order],
    )
    bounds = np.searchsorted(run_col, np.arange(n_cols + 1))
    centre = centre + first_row
    unary = np.where(kind == 2, NONE_COST, BASELINE_WEIGHT * np.abs(centre - panel.baseline_y_px))
    chosen = np.asarray(_best_path(run_start, run_last, centre, unary, kind == 2, bounds))
    y = np.where(kind[chosen] == 0, centre[chosen], np.nan)
    t_s = panel.t_start_s + np.arange(n_cols) / panel.px_per_s
    mv = (panel.baseline_y_px - y) / panel.px_per_mv
    return t_s, mv

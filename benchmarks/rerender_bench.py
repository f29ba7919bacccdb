"""What the robustness sweep's re-rendering costs per image, next to prepare's own drawing.

    PYTHONPATH=$PWD python benchmarks/rerender_bench.py --repeats 3

Records: the bundled CPSC-2018 and Chapman-Shaoxing records and the first MIT-BIH windows,
drawn with the demo's render config (``layout: auto``, 100 dpi). Rows:

* ``prepare``: what ``build_shard`` spends per record on reading and drawing it;
* one row per sweep condition at strength 1 (and ``ecg_plot``): what the evaluation's task
  spends per image, the record read once per sample for all conditions as
  ``conditions.rerendered`` does (the read shared out over ``--conditions`` images, the
  number of conditions of the sweep run), its ratio to ``prepare``'s clean printout, and to
  what prepare spends on the same image (a data set prepared with that augmentation: read
  plus the same drawing).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mitdb-windows", type=int, default=10)
    parser.add_argument("--conditions", type=int, default=22,
                        help="conditions that share one read of the record (configs/evaluate.yaml: 22)")
    args = parser.parse_args()

    from ecgvlm.config import config_to_dict
    from ecgvlm.dataset import read_sample_record
    from ecgvlm.evaluate.conditions import ARTEFACTS, PRINTERS, condition_name, rerender_png, sample_seed
    from ecgvlm.render import RenderConfig, render_printout
    from ecgvlm.signal import find_record_paths, read_record, read_windows

    rows = []  # (source_path, dataset, record_id)
    for name in ("cpsc2018", "chapman_shaoxing"):
        for path in find_record_paths(REPO / "data" / "samples" / name):
            rows.append((str(path), read_record(path).dataset, read_record(path).record_id))
    mitdb = REPO / "data" / "samples" / "mitdb" / "106"
    rows += [(str(mitdb), "mitdb", w.record_id) for w in read_windows(mitdb)[: args.mitdb_windows]]
    render = RenderConfig(layout="auto")
    render_json = json.dumps(config_to_dict(render), sort_keys=True)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best / len(rows) * 1000

    def read_all():
        return [read_sample_record(p, d, r, 10.0) for p, d, r in rows]

    records = read_all()
    read_ms = timed(read_all)
    draw_ms = timed(lambda: [render_printout(r, render, seed=0) for r in records])
    prepare_ms = read_ms + draw_ms
    print(f"{len(rows)} records ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}); best of {args.repeats}; ms per image")
    print(f"| condition | draw ms | + read / {args.conditions} ms | total ms | vs prepare, clean "
          "| vs prepare, same image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(f"| prepare (read + draw) | {draw_ms:.1f} | {read_ms:.1f} (not shared) | {prepare_ms:.1f} "
          "| 1.00x | 1.00x |")
    shared_read_ms = read_ms / args.conditions
    for artefact in ARTEFACTS:
        condition = artefact if artefact in PRINTERS else condition_name(artefact, 1.0)
        ms = timed(lambda c=condition: [
            rerender_png(r, c, render_json, sample_seed(0, r.record_id)) for r in records])
        total = ms + shared_read_ms
        print(f"| {condition} | {ms:.1f} | {shared_read_ms:.1f} | {total:.1f} | "
              f"{total / prepare_ms:.2f}x | {total / (read_ms + ms):.2f}x |")


if __name__ == "__main__":
    main()

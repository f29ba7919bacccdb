"""Printout rendering speed on one core: ecgvlm vs ecg_plot 0.2.8 vs the PNG-encode floor.

    python benchmarks/render_bench.py --ecg-plot-python /tmp/render-env/bin/python

ecg_plot 0.2.8 is the study's renderer; it is never a project dependency. Install it in a
throwaway environment and point ``--ecg-plot-python`` at that interpreter:

    python3 -m venv /tmp/render-env
    /tmp/render-env/bin/pip install ecg_plot==0.2.8 matplotlib numpy

The record is a 12-lead, 10 s, 500 Hz ECG (a Chapman-Shaoxing sample). Every timed process is
pinned to one CPU core, and times are CPU seconds of that process (``time.process_time``),
medians over repeats, so other load on a shared machine inflates them little. Rows:

- ecgvlm ``render_printout`` at 100 and 200 dpi (3x4+II, the default 300 x 150 mm page);
- the floor: PNG-encoding our own finished palette image and nothing else, with the same
  encoder ``render_printout`` uses (``raster.encode_palette_png``: deflate level 1 through
  libdeflate when the ``deflate`` package is installed, else zlib), plus the same image
  through Pillow's PNG writer at zlib level 1 for reference;
- ecg_plot 0.2.8 ``plot`` drawing the same 3x4 + lead II rhythm strip (16 pseudo-leads of
  2.5 s, 4 columns) and saving a PNG, at the dpi that gives the same image width as ours;
- ecg_plot 0.2.8 ``plot_12`` (2 columns of 10 s, the study's call), at the same width.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ecgvlm.records import EcgRecord
from ecgvlm.render import RenderConfig, raster, render_printout

SAMPLE = REPO / "data" / "samples" / "chapman_shaoxing" / "JS00001"

# Runs inside the ecg_plot environment: reads the signal, prints {"name": [cpu_s, ...]}.
ECG_PLOT_SCRIPT = r"""
import json, os, sys, time
os.sched_setaffinity(0, {int(sys.argv[4])})
import numpy as np
import matplotlib
matplotlib.use("Agg")
import ecg_plot

signal = np.load(sys.argv[1])  # (12, 5000), mV
width_px, repeats, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
fs = 500
seg = signal.shape[1] // 4
# 3x4 + rhythm strip in ecg_plot's column-major lead order: column c shows 2.5 s segment c
# of its three leads, then one 2.5 s piece of lead II, so row 4 is a 10 s rhythm strip.
columns = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
pseudo, names = [], []
for c, leads in enumerate(columns):
    for lead in leads:
        pseudo.append(signal[lead, c * seg:(c + 1) * seg])
        names.append(["I","II","III","aVR","aVL","aVF","V1","V2","V3","V4","V5","V6"][lead])
    pseudo.append(signal[1, c * seg:(c + 1) * seg])
    names.append("II")
pseudo = np.asarray(pseudo)

def plot_3x4():
    ecg_plot.plot(pseudo, sample_rate=fs, title="", lead_index=names, columns=4)
    # figure: 2.5 s x 4 columns = 10 in wide; dpi for equal width
    ecg_plot.save_as_png("ecg_plot_3x4", out + "/", dpi=width_px / 10.0, layout=None)

def plot_12():
    ecg_plot.plot_12(signal, sample_rate=fs, title="")
    import matplotlib.pyplot as plt
    w_in = plt.gcf().get_size_inches()[0]
    ecg_plot.save_as_png("ecg_plot_12", out + "/", dpi=width_px / w_in, layout=None)

results = {}
for name, fn, n in (("plot_3x4", plot_3x4, repeats), ("plot_12", plot_12, max(repeats // 2, 2))):
    fn()  # warm-up: imports, font cache
    times = []
    for _ in range(n):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    from PIL import Image
    size = Image.open(out + ("/ecg_plot_3x4.png" if name == "plot_3x4" else "/ecg_plot_12.png")).size
    results[name] = {"times": times, "size": size}
print(json.dumps(results))
"""


def load_record() -> EcgRecord:
    if Path(f"{SAMPLE}.hea").is_file():
        from ecgvlm.signal import read_record

        record = read_record(SAMPLE)
        n = round(10 * record.fs_hz)
        return EcgRecord(
            record.record_id, record.dataset, record.signal_mv[:n], record.fs_hz, record.leads
        )
    t = np.arange(5000) / 500.0
    beat = np.exp(-(((((t * 1.2) % 1.0) - 0.3) / 0.015) ** 2))
    return EcgRecord(
        "synthetic/1",
        "synthetic",
        np.tile(beat[:, None], 12),
        500.0,
        ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"),
    )


def cpu_times(fn, repeats: int) -> list[float]:
    fn()  # warm-up: grid cache, font, imports
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ecg-plot-python",
        default=None,
        help="python of a venv with ecg_plot==0.2.8 (row skipped without)",
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ecg-plot-repeats", type=int, default=5)
    parser.add_argument("--core", type=int, default=min(os.sched_getaffinity(0)))
    parser.add_argument("--keep-images", default=None, help="folder to keep sample outputs in")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.core})
    from PIL import Image

    record = load_record()
    rows = []
    for dpi in (100, 200):
        config = RenderConfig(dpi=dpi)
        printout = render_printout(record, config)
        ours = statistics.median(
            cpu_times(lambda c=config: render_printout(record, c), args.repeats)
        )
        image = Image.open(io.BytesIO(printout.png))
        image.load()
        scanlines = raster.palette_rows(image.height, image.width)
        scanlines[:, 1:] = np.asarray(image)
        palette = bytes(image.getpalette())

        def encode_ours(scanlines=scanlines, palette=palette):
            raster.encode_palette_png(scanlines, palette)

        def encode_pillow(image=image):
            image.save(io.BytesIO(), format="PNG", compress_level=1)

        floor = statistics.median(cpu_times(encode_ours, args.repeats))
        pillow = statistics.median(cpu_times(encode_pillow, args.repeats))
        row = {"dpi": dpi, "size": printout.size_px, "ours": ours, "floor": floor, "pillow": pillow}
        if args.ecg_plot_python:
            with tempfile.TemporaryDirectory() as tmp:
                np.save(f"{tmp}/signal.npy", record.signal_mv.T.astype(np.float64))
                proc = subprocess.run(
                    [
                        args.ecg_plot_python,
                        "-c",
                        ECG_PLOT_SCRIPT,
                        f"{tmp}/signal.npy",
                        str(printout.size_px[0]),
                        str(args.ecg_plot_repeats),
                        str(args.core),
                        tmp,
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                row["ecg_plot"] = json.loads(proc.stdout.strip().splitlines()[-1])
                if args.keep_images:
                    keep = Path(args.keep_images)
                    keep.mkdir(parents=True, exist_ok=True)
                    for name in ("ecg_plot_3x4", "ecg_plot_12"):
                        Path(f"{tmp}/{name}.png").replace(keep / f"{name}_{dpi}dpi.png")
        if args.keep_images:
            Path(args.keep_images, f"ecgvlm_{dpi}dpi.png").write_bytes(printout.png)
        rows.append(row)

    print(
        f"one core (cpu {args.core}), CPU ms per image (median), record {record.record_id}, "
        f"12 leads, {record.duration_s:g} s, {record.fs_hz:g} Hz"
    )
    print()
    print(
        "| renderer | dpi | image px | ms/image | images/s | ecg_plot 3x4 / this | "
        "this / encode floor |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        w, h = row["size"]
        ep = row.get("ecg_plot", {})
        ep_3x4 = statistics.median(ep["plot_3x4"]["times"]) if ep else None

        def line(name, seconds, size, vs_ecg_plot, vs_floor, dpi=row["dpi"]):
            print(
                f"| {name} | {dpi} | {size[0]}x{size[1]} | {seconds * 1e3:,.1f} | "
                f"{1 / seconds:,.1f} | {vs_ecg_plot} | {vs_floor} |"
            )

        line(
            "ecgvlm render_printout 3x4+II",
            row["ours"],
            (w, h),
            f"{ep_3x4 / row['ours']:,.0f}x" if ep else "-",
            f"{row['ours'] / row['floor']:.2f}x",
        )
        line(
            "PNG encode of our image (floor)",
            row["floor"],
            (w, h),
            f"{ep_3x4 / row['floor']:,.0f}x" if ep else "-",
            "1.00x",
        )
        line(
            "same image, Pillow PNG zlib level 1",
            row["pillow"],
            (w, h),
            f"{ep_3x4 / row['pillow']:,.0f}x" if ep else "-",
            f"{row['pillow'] / row['floor']:.2f}x",
        )
        if ep:
            for name, label in (
                ("plot_3x4", "ecg_plot 0.2.8 plot, 3x4 + rhythm strip"),
                ("plot_12", "ecg_plot 0.2.8 plot_12"),
            ):
                seconds = statistics.median(ep[name]["times"])
                line(label, seconds, ep[name]["size"], f"{ep_3x4 / seconds:.2f}x", "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())

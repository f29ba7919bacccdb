"""Printout renderer: images checked by properties (size, grid pitch, where ink is), not pixels."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ecgvlm.cli import main as cli_main
from ecgvlm.config import ConfigError, load_config
from ecgvlm.records import EcgRecord, Printout
from ecgvlm.render import (
    AUGMENTATIONS,
    STANDARD_LEADS,
    PngError,
    RenderConfig,
    RenderError,
    raster,
    render_printout,
    trace_from_image,
)
from ecgvlm.signal import read_record
from tests.unit.test_render_faithfulness import panel_correlations

LEAD_GAIN = np.linspace(0.4, 1.6, 12)  # each lead a different amplitude (mV)


def synthetic(
    fs_hz: float = 500.0,
    duration_s: float = 10.0,
    leads: tuple[str, ...] = STANDARD_LEADS,
    rate_bpm: float = 75.0,
    record_id: str = "synthetic/1",
) -> EcgRecord:
    """A crude but ECG-like signal: narrow QRS spikes plus a T wave, per-lead gains."""
    t = np.arange(round(fs_hz * duration_s)) / fs_hz
    phase = (t * rate_bpm / 60.0) % 1.0
    beat = (
        1.0 * np.exp(-(((phase - 0.3) / 0.012) ** 2))
        + 0.3 * np.exp(-(((phase - 0.6) / 0.05) ** 2))
        - 0.15 * np.exp(-(((phase - 0.33) / 0.01) ** 2))
    )
    signal = beat[:, None] * LEAD_GAIN[: len(leads)][None, :]
    return EcgRecord(record_id, "synthetic", signal, fs_hz, leads, labels=("AF",))


def decode(printout: Printout) -> Image.Image:
    image = Image.open(io.BytesIO(printout.png))
    image.load()
    return image


def ink(printout: Printout) -> np.ndarray:
    """Ink coverage 0-1 per pixel (the red channel: every grid colour keeps red at 255)."""
    rgb = np.asarray(decode(printout).convert("RGB"))
    return 1.0 - rgb[:, :, 0] / 255.0


def min_correlation(record: EcgRecord, printout: Printout) -> float:
    """The worst panel's Pearson r between digitised trace and source (see the sweep)."""
    return min(r for _, _, r in panel_correlations(record, printout))


# --- config ------------------------------------------------------------------------------


def test_config_errors_name_field_and_choices():
    with pytest.raises(ConfigError, match="paper_speed_mm_s must be one of 25, 50, got 30"):
        RenderConfig(paper_speed_mm_s=30)
    with pytest.raises(ConfigError, match="mm_per_mv must be one of 5, 10, 20, got 7"):
        RenderConfig(mm_per_mv=7)
    with pytest.raises(ConfigError, match="layout must be one of"):
        RenderConfig(layout="4x3")
    with pytest.raises(ConfigError, match="augment must be one of"):
        RenderConfig(augment=("noise", "sparkles"))
    with pytest.raises(ConfigError, match="dpi must be in"):
        RenderConfig(dpi=5)


def test_config_hash_is_stable_and_resolved(tmp_path):
    base = RenderConfig()
    assert base.config_hash() == RenderConfig().config_hash()
    assert len(base.config_hash()) == 12
    assert RenderConfig(dpi=150).config_hash() != base.config_hash()
    assert (
        RenderConfig(augment=True).config_hash()
        == RenderConfig(augment=AUGMENTATIONS).config_hash()
    )
    path = tmp_path / "render.yaml"
    path.write_text("layout: 6x2\naugment: [noise, blur]\n")
    loaded = load_config(RenderConfig, path, ["dpi=150"])
    assert loaded == RenderConfig(layout="6x2", augment=("noise", "blur"), dpi=150)


# --- the default page ---------------------------------------------------------------------


def test_default_page_is_a_valid_palette_png_with_13_panels():
    record = synthetic()
    printout = render_printout(record)
    image = decode(printout)
    assert image.format == "PNG" and image.mode == "P"
    assert image.size == printout.size_px == (1181, 591)  # 300 x 150 mm at 100 dpi: 2:1
    assert printout.layout == "3x4+II" and printout.geometry_exact
    leads = [p.lead for p in printout.panels]
    assert leads == [
        "I",
        "aVR",
        "V1",
        "V4",
        "II",
        "aVL",
        "V2",
        "V5",
        "III",
        "aVF",
        "V3",
        "V6",
        "II",
    ]
    px_per_s = printout.px_per_mm * 25
    for panel in printout.panels[:12]:
        x0, y0, x1, y1 = panel.box_px
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        assert abs((x1 - x0) - 2.5 * px_per_s) <= 1
        assert panel.t_start_s in (0.0, 2.5, 5.0, 7.5)
        assert y0 <= panel.baseline_y_px < y1
    rhythm = printout.panels[-1]
    assert rhythm.t_start_s == 0.0 and rhythm.t_end_s == pytest.approx(10.0, abs=0.02)
    geometry = json.loads(printout.to_json())
    assert len(geometry["panels"]) == 13 and geometry["size_px"] == [1181, 591]


def test_grid_pitch_is_1_and_5_mm():
    printout = render_printout(synthetic(), RenderConfig(dpi=200, caption=False))
    index = np.asarray(decode(printout))
    grid = index[-3] >> 4  # a row near the bottom edge: grid only, no ink
    major = np.flatnonzero(grid >= 12)
    minor = np.flatnonzero((grid >= 3) & (grid <= 7))
    mm = printout.px_per_mm
    major_starts = major[np.diff(major, prepend=-10) > 1]
    assert np.allclose(np.diff(major_starts), 5 * mm, atol=1.01)
    minor_starts = minor[np.diff(minor, prepend=-10) > 1]
    assert np.median(np.diff(minor_starts)) == pytest.approx(mm, abs=1.01)


def test_calibration_pulse_is_1_mv_tall():
    for gain in (5, 10, 20):
        printout = render_printout(synthetic(), RenderConfig(mm_per_mv=gain, caption=False))
        # The bottom row's pulse: the pulse of the row above ends a row pitch higher.
        rhythm = printout.panels[-1]
        x0, y0, _, y1 = rhythm.box_px
        top = round((y0 + y1) / 2 - 1.3 * rhythm.px_per_mv)
        dark = ink(printout)[top:y1, : x0 - 2] > 0.5
        rows = np.flatnonzero(dark.any(axis=1))
        height_px = rows.max() - rows.min()
        assert height_px == pytest.approx(rhythm.px_per_mv, abs=2.0)


def test_pixels_map_back_to_seconds_and_millivolts():
    """A 1 mV spike at t = 6.3 s in lead V2 lands where the panel geometry says."""
    record = synthetic()
    signal = np.zeros_like(record.signal_mv)
    spike = round(6.3 * record.fs_hz)
    signal[spike - 2 : spike + 3, record.leads.index("V2")] = 1.0
    record = replace(record, signal_mv=signal)
    printout = render_printout(record, RenderConfig(dpi=200))
    panel = next(p for p in printout.panels if p.lead == "V2")
    assert panel.t_start_s == 5.0
    x0, _, x1, _ = panel.box_px
    # Past the lead-change marker, and below the lead's label.
    first_row = round(panel.baseline_y_px - 1.3 * panel.px_per_mv)
    dark = ink(printout)[first_row:, x0 + 2 : x1] > 0.5
    top_row = np.where(dark.any(axis=0), dark.argmax(axis=0), 10**6) + first_row
    column = x0 + 2 + int(np.argmin(top_row))
    assert column == pytest.approx(x0 + (6.3 - panel.t_start_s) * panel.px_per_s, abs=2)
    assert (panel.baseline_y_px - top_row.min()) / panel.px_per_mv == pytest.approx(1.0, abs=0.05)


def test_same_signal_same_image_whatever_the_id_and_labels():
    """Nothing but the signal reaches the page: the model cannot read the answer off it."""
    a = synthetic(record_id="cpsc2018/A0001")
    b = replace(a, record_id="other/B7", labels=("RBBB", "LBBB"), patient_id="p9")
    assert render_printout(a).png == render_printout(b).png


# --- layouts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "n_panels", "seconds"), [("6x2", 12, 5.0), ("12x1", 12, 10.0)])
def test_other_layouts(layout, n_panels, seconds):
    record = synthetic()
    printout = render_printout(record, RenderConfig(layout=layout))
    assert len(printout.panels) == n_panels
    for panel in printout.panels:
        assert panel.t_end_s - panel.t_start_s == pytest.approx(seconds, abs=0.02)
    assert min_correlation(record, printout) > 0.99
    if layout == "12x1":
        assert printout.size_px == (1181, 1181)  # 1:1 page for 12 rows


def test_strip_layout_on_a_real_mitbih_window(samples_dir):
    record = read_record(samples_dir / "mitdb" / "106")
    window = replace(record, signal_mv=record.signal_mv[: round(10 * record.fs_hz)])
    printout = render_printout(window, RenderConfig(layout="auto"))
    assert printout.layout == "strip" and printout.size_px == (1181, 394)  # 3:1 page
    assert [p.lead for p in printout.panels] == list(record.leads)
    assert min_correlation(window, printout) > 0.98


def test_missing_leads_error_names_them_or_are_skipped():
    leads = tuple(lead for lead in STANDARD_LEADS if lead != "aVL")
    record = synthetic(leads=leads)
    with pytest.raises(RenderError, match="needs lead\\(s\\) aVL"):
        render_printout(record)
    printout = render_printout(record, RenderConfig(missing_leads="skip"))
    assert "aVL" not in [p.lead for p in printout.panels] and len(printout.panels) == 12
    with pytest.raises(RenderError, match="up to 4 leads"):
        render_printout(record, RenderConfig(layout="strip"))


def test_lead_names_match_case_insensitively():
    record = synthetic(leads=tuple(lead.lower() for lead in STANDARD_LEADS))
    assert len(render_printout(record).panels) == 13


# --- awkward records ----------------------------------------------------------------------


@pytest.mark.parametrize("fs_hz", [100.0, 257.0, 360.0, 1000.0])
def test_any_sampling_rate(fs_hz):
    record = synthetic(fs_hz=fs_hz)
    printout = render_printout(record)
    assert min_correlation(record, printout) > 0.98


def test_short_record_leaves_the_rest_blank():
    record = synthetic(duration_s=4.0)
    printout = render_printout(record, RenderConfig(caption=False))
    assert [p.t_start_s for p in printout.panels[:6]] == [0.0, 2.5] * 3
    assert len(printout.panels) == 7  # columns 3 and 4 start after the record ends
    rhythm = printout.panels[-1]
    assert rhythm.t_end_s == pytest.approx(4.0)
    x_end = rhythm.box_px[0] + round(4.0 * rhythm.px_per_s)
    assert (ink(printout)[:, x_end + 2 :] > 0.3).sum() == 0


def test_long_record_draws_the_first_ten_seconds():
    long = synthetic(duration_s=30.0)
    short = replace(long, signal_mv=long.signal_mv[: 5000 + 2])
    assert render_printout(long).png == render_printout(short).png


def test_nan_stretch_is_a_gap():
    record = synthetic(leads=("MLII", "V1"))
    signal = record.signal_mv.copy()
    signal[2000:2500, 0] = np.nan  # 4.0-5.0 s
    printout = render_printout(replace(record, signal_mv=signal), RenderConfig(layout="strip"))
    t_s, mv = trace_from_image(printout.png, printout.panels[0])
    inside = (t_s > 4.05) & (t_s < 4.95)
    outside = (t_s < 3.9) | (t_s > 5.1)
    assert np.isnan(mv[inside]).all()
    assert np.isfinite(mv[outside]).all()


def test_amplitudes_beyond_the_band_overlap_unless_clipped():
    record = synthetic(leads=("MLII", "V1"))
    signal = record.signal_mv.copy()
    signal[1000:1010, 0] = 6.0  # 6 mV = 60 mm: taller than the 45 mm row
    record = replace(record, signal_mv=signal)
    for clip in (False, True):
        printout = render_printout(record, RenderConfig(layout="strip", clip_to_panel=clip))
        panel = printout.panels[0]
        x0, y0, _, _ = panel.box_px
        spike = x0 + round((2.0 - panel.t_start_s) * panel.px_per_s)
        dark = ink(printout)[:, spike - 3 : spike + 6] > 0.5
        top_row = np.flatnonzero(dark.any(axis=1)).min()
        if clip:
            assert top_row == y0  # drawn flat along the band's top edge
        else:
            assert top_row == 0  # over the margin, up to the page's edge


# --- styles and augmentations -------------------------------------------------------------


def test_ecg_plot_style_blue_trace_no_calibration():
    printout = render_printout(synthetic(), RenderConfig(style="ecg_plot", caption=False))
    rgb = np.asarray(decode(printout).convert("RGB")).reshape(-1, 3)
    darkest = rgb[np.argmin(rgb[:, 0])]
    assert tuple(darkest) == raster.ECG_PLOT.ink  # dark blue ink (0, 0, 179)
    x0 = printout.panels[0].box_px[0]
    assert (ink(printout)[:, : x0 - 1] > 0.5).sum() == 0  # ecg_plot draws no pulse
    assert min_correlation(synthetic(), printout) > 0.98


def test_augmentations_are_off_by_default_seeded_and_valid():
    record = synthetic()
    plain = render_printout(record)
    assert plain.augmentations == ()
    for name in AUGMENTATIONS:
        config = RenderConfig(augment=(name,))
        one = render_printout(record, config, seed=1)
        assert one.augmentations == (name,)
        assert one.png == render_printout(record, config, seed=1).png
        assert one.png != render_printout(record, config, seed=2).png
        assert one.png != plain.png
        assert decode(one).size == plain.size_px
        assert one.geometry_exact == (name != "rotation")
    every = render_printout(record, RenderConfig(augment=True), seed=3)
    assert every.augmentations == AUGMENTATIONS and not every.geometry_exact


def test_non_geometric_augmentations_keep_the_trace_readable(samples_dir):
    """Blur and JPEG soften spike tips, so a few panels lose some r; the trace stays."""
    record = read_record(samples_dir / "cpsc2018" / "A0002")
    config = RenderConfig(augment=("noise", "blur", "jpeg", "tint", "grid_dropout"))
    for seed in range(3):
        printout = render_printout(record, config, seed=seed)
        assert printout.geometry_exact
        r = [r for _, _, r in panel_correlations(record, printout)]
        assert np.median(r) > 0.97 and min(r) > 0.8


def test_rgb_png_reads_back_exactly_and_is_checked(monkeypatch):
    printout = render_printout(synthetic(), RenderConfig(augment=("noise", "rotation")), seed=3)
    rgb = np.asarray(decode(printout).convert("RGB"))
    assert decode(printout).mode == "RGB" and raster.encode_rgb_png(rgb) == printout.png
    monkeypatch.setattr(raster, "_zlib_level1", lambda raw: raster.zlib.compress(raw[1:], 1))
    with pytest.raises(PngError, match="do not match"):
        raster.encode_rgb_png(rgb)
    monkeypatch.undo()
    monkeypatch.setattr(raster, "_chunk", lambda kind, data: b"\0" * 8)
    with pytest.raises(PngError, match="unreadable"):  # a corrupt PNG is never returned
        raster.encode_rgb_png(rgb)


def test_palette_png_reads_back_exactly_and_is_checked(monkeypatch):
    printout = render_printout(synthetic())
    index = np.asarray(decode(printout))
    rows = raster.palette_rows(*index.shape)
    rows[:, 1:] = index
    assert raster.encode_palette_png(rows, raster.palette(raster.CLINICAL)) == printout.png
    monkeypatch.setattr(raster, "_zlib_level1", lambda raw: raster.zlib.compress(raw[1:], 1))
    with pytest.raises(PngError, match="do not match"):
        raster.encode_palette_png(rows, raster.palette(raster.CLINICAL))


def test_render_imports_neither_torch_nor_ray():
    code = (
        "import sys, ecgvlm.render, ecgvlm.render.printout, ecgvlm.render.digitise;"
        "bad = [m for m in ('torch', 'ray', 'matplotlib') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CLI ----------------------------------------------------------------------------------


def test_cli_renders_a_sample_record(samples_dir, tmp_path, capsys):
    out, geometry = tmp_path / "a.png", tmp_path / "a.json"
    path = str(samples_dir / "cpsc2018" / "A0002")
    assert cli_main(["render", path, "-o", str(out), "--geometry", str(geometry)]) == 0
    with Image.open(out) as image:
        assert image.size == (1181, 591)
    assert len(json.loads(geometry.read_text())["panels"]) == 13
    mit = str(samples_dir / "mitdb" / "106")
    assert cli_main(["render", mit, "-o", str(out), "--start-s", "60", "--dpi", "150"]) == 0
    assert "layout strip" in capsys.readouterr().out
    assert cli_main(["render", mit, "-o", str(out), "--layout", "3x4+II"]) == 2
    assert "needs lead(s)" in capsys.readouterr().err
    # The bytes are a PNG whatever the name: another suffix is refused, not written misnamed.
    for name in ("a.jpg", "a.pdf", "folder"):
        assert cli_main(["render", path, "-o", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"ecgvlm render: error: -o {tmp_path / name}: a printout is a PNG image; give a "
            "path ending in .png")
        assert not (tmp_path / name).exists()
    assert cli_main(["render", path, "-o", str(tmp_path / "b.PNG")]) == 0

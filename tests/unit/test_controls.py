"""The image controls of the evaluation: the blank page, the donors of mismatched printouts,
and the paired comparison with the normal printouts."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from ecgvlm.evaluate.conditions import compare_conditions, condition_inputs
from ecgvlm.evaluate.job import EvalConfig, expand_pending
from ecgvlm.render.config import RenderConfig
from ecgvlm.render.printout import blank_printout, render_printout
from ecgvlm.signal import read_record
from tests.fakes.mcq_split import sample_rows, write_split


def _ink(png: bytes) -> np.ndarray:
    """Ink pixels of a palette PNG (the low nibble of the index; the grid is the high one)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    assert image.mode == "P"
    return (np.asarray(image) & 0x0F) > 0


@pytest.mark.parametrize("record_path", ["cpsc2018/A0002", "mitdb/106"])
def test_blank_page_has_no_trace_only_what_every_page_has(samples_dir, record_path):
    record = read_record(samples_dir / record_path)
    config = RenderConfig(layout="auto")
    real = render_printout(record, config)
    blank = blank_printout(record.leads, config, fs_hz=record.fs_hz, duration_s=record.duration_s)
    assert blank.layout == real.layout and blank.size_px == real.size_px
    assert [p.box_px for p in blank.panels] == [p.box_px for p in real.panels]
    blank_ink, real_ink = _ink(blank.png), _ink(real.png)
    # Labels, calibration pulses, separators and caption are on both pages; traces only on the
    # printout: the blank page's ink is a subset of the printout's, and a small one.
    assert not (blank_ink & ~real_ink).any()
    assert real_ink.sum() > 4 * blank_ink.sum()


def _meta(rows):
    return pd.DataFrame([{k: v for k, v in r.items() if k != "png"} for r in rows])


def test_mismatched_donors_never_offer_their_finding_among_the_options(tmp_path):
    from ecgvlm.evaluate.job import read_split_meta, split_files

    rows = sample_rows(8, measurements=True)
    config = EvalConfig(data_dir=str(tmp_path), controls=("blank", "mismatched"))
    # The driver holds no question or options: the recipients' are read from the shards.
    files = split_files(write_split(tmp_path / "prepared", rows), "test")
    meta = read_split_meta(files)
    assert "question" not in meta and "options" not in meta
    kwargs, notes = condition_inputs(config, meta, files)
    note = notes.get("controls")
    by_id = {r["sample_id"]: r for r in rows}
    recipients = [(r.pop("donor"), r) for r in kwargs["recipients"].to_pylist()]
    assert len(recipients) + (int(note.split()[1]) if note else 0) == len(rows)
    for donor, recipient in recipients:
        d = by_id[donor]
        assert d["dataset"] == recipient["dataset"] and donor != recipient["sample_id"]
        assert d["option_labels"][d["answer_index"]] not in recipient["option_labels"]
    for _, recipient in recipients:
        sent = by_id[recipient["sample_id"]]
        assert recipient == {k: sent[k] for k in ("sample_id", "dataset", "question", "options",
                                                  "option_labels", "answer_letter")}
    # Seeded: the same donors again.
    assert condition_inputs(config, meta, files)[0]["recipients"].equals(kwargs["recipients"])

    import pyarrow as pa

    batch = pa.Table.from_pylist([{k: r[k] for k in ("sample_id", "dataset", "question", "options",
                                                      "option_labels", "answer_letter", "png")}
                                  for r in rows])
    pending = {("m", "choice", "text_only"): [rows[1]["sample_id"]],
               ("m", "choice", "blank"): [rows[0]["sample_id"]],
               ("m", "choice", "mismatched"): [r["sample_id"] for _, r in recipients]}
    out = expand_pending(batch, pending, **kwargs).to_pylist()
    (text_only,) = [r for r in out if r["condition"] == "text_only"]
    assert text_only["png"] == b"" and text_only["sample_id"] == rows[1]["sample_id"]
    from ecgvlm.prompt import chat_messages

    parts = chat_messages(text_only["question"], text_only["options"], text_only["png"] or None)
    assert [p["type"] for p in parts[-1]["content"]] == ["text"]  # asked with no image
    blank = [r for r in out if r["condition"] == "blank"]
    assert len(blank) == 1 and blank[0]["png"] != rows[0]["png"]
    # Without measurements the blank page has the 12 standard leads; with them, the
    # record's own (read from the batch's measurements where the batch is made).
    from ecgvlm.evaluate.conditions import blank_png
    from ecgvlm.signal import STANDARD_LEADS

    assert blank[0]["png"] == blank_png(STANDARD_LEADS, kwargs["render_json"])
    two_leads = '{"record_id": "r", "leads": [{"lead": "MLII", "quality": "ok"}, {"lead": "V1", "quality": "ok"}]}'
    measured = batch.append_column("measurements", pa.array([two_leads] * len(batch)))
    blank_png.cache_clear()
    two = {("m", "choice", "blank"): [rows[0]["sample_id"], rows[2]["sample_id"]]}
    pages = [r["png"] for r in expand_pending(measured, two, **kwargs).to_pylist()]
    assert len(pages) == 2 and blank_png.cache_info().misses == 1  # drawn once per lead set
    assert pages[0] == pages[1] == blank_png(("MLII", "V1"), kwargs["render_json"])
    assert pages[0] != blank_png(STANDARD_LEADS, kwargs["render_json"])
    mismatched = [r for r in out if r["condition"] == "mismatched"]
    assert len(mismatched) == len(recipients)
    for r in mismatched:
        donor = next(d for d, rec in recipients if rec["sample_id"] == r["sample_id"])
        assert r["png"] == by_id[donor]["png"] and r["question"] == by_id[r["sample_id"]]["question"]


def test_paired_differences_by_hand():
    # Four samples of two patients: right on the printout 3 times, on the blank page once.
    normal = [True, True, True, False]
    blank = [False, True, False, False]
    rows = []
    for i, (n, b) in enumerate(zip(normal, blank)):
        for condition, right in (("normal", n), ("blank", b)):
            rows.append({"sample_id": f"s{i}", "model": "m", "dataset": "d", "answer_mode": "choice",
                         "condition": condition, "true_label": "AF",
                         "predicted_label": "AF" if right else "NSR"})
    clusters = {"s0": "patient:a", "s1": "patient:a", "s2": "patient:b", "s3": "patient:b"}
    out = compare_conditions(pd.DataFrame(rows), "choice", ("blank",), clusters, 500, 0)
    entry = out["m"]["d"]
    assert entry["accuracy_normal"] == 0.75 and entry["blank"]["accuracy"] == 0.25
    assert entry["blank"]["difference"] == pytest.approx(0.5)
    # Patient a's differences are (1, 0), patient b's (1, 0): every resample of patients
    # has a mean of 0.5, so the paired interval is [0.5, 0.5].
    assert entry["blank"]["ci"] == pytest.approx((0.5, 0.5))
    one = compare_conditions(pd.DataFrame(rows), "choice", ("blank",), {s: "patient:a" for s in clusters},
                           500, 0)
    assert one["m"]["d"]["blank"]["ci"] is None  # one patient: no interval


def test_controls_config_names_the_bad_one():
    from ecgvlm.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="controls must be one of 'text_only', 'blank', 'mismatched', got 'text'"):
        config_from_dict(EvalConfig, {"data_dir": "d", "controls": ["text"]})


def test_robustness_config_names_its_conditions_and_the_bad_entry():
    from ecgvlm.config import ConfigError, config_from_dict
    from ecgvlm.evaluate.conditions import RobustnessConfig, parse_condition

    sweep = RobustnessConfig(artefacts=("jpeg", "ecg_plot", "noise"), strengths=(2, 0.5))
    assert sweep.conditions() == ("jpeg@0.5", "jpeg@2", "ecg_plot", "noise@0.5", "noise@2")
    assert parse_condition("jpeg@0.5") == ("jpeg", 0.5) and parse_condition("ecg_plot") == ("ecg_plot", None)
    assert RobustnessConfig().conditions() == ()
    with pytest.raises(ConfigError, match="robustness.artefacts must be one of .* got 'smudge'"):
        config_from_dict(EvalConfig, {"data_dir": "d", "robustness": {"artefacts": ["smudge"]}})
    with pytest.raises(ConfigError, match="robustness.strengths"):
        RobustnessConfig(artefacts=("blur",), strengths=(5.0,))
    with pytest.raises(ConfigError, match="must not repeat"):
        RobustnessConfig(artefacts=("blur", "blur"))


def test_sweep_needs_readable_records_and_says_which_is_missing(tmp_path, samples_dir):
    rows = sample_rows(2)
    from ecgvlm.evaluate.conditions import RobustnessConfig

    config = EvalConfig(data_dir=str(tmp_path), robustness=RobustnessConfig(artefacts=("noise",)))
    sweep = config.robustness.conditions()
    # Prepared before source_path existed: not run, and the note says how to fix it.
    kwargs, notes = condition_inputs(config, _meta(rows), (), sweep)
    assert kwargs["sweep"] == () and "no source_path column" in notes["robustness"]
    # A record that is not where it was prepared from is named.
    present = str(samples_dir / "cpsc2018" / "A0002")
    meta = _meta([{**r, "source_path": p} for r, p in zip(rows, [present, str(tmp_path / "gone")])])
    kwargs, notes = condition_inputs(config, meta, (), sweep)
    assert kwargs["sweep"] == () and str(tmp_path / "gone") in notes["robustness"]
    meta = _meta([{**r, "source_path": present} for r in rows])
    kwargs, notes = condition_inputs(config, meta, (), sweep)
    assert kwargs["sweep"] == sweep and notes == {}

"""Readers on the real records, on the original-release formats, and on corrupted inputs."""

from __future__ import annotations

import csv
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import wfdb
from scipy.io import savemat

from ecgvlm import labels as L
from ecgvlm import signal as S

STAGED_DATASETS = {
    "chapman_shaoxing": "chapman_shaoxing",
    "cpsc2018": "cpsc2018",
    "cpsc2018_extra": "cpsc2018_extra",
    "georgia": "georgia",
    "ptb-xl": "ptbxl",
    "mitdb": "mitdb",
    "ptbdb": "ptbdb",
}
# LUDB and the QT Database (the delineation references) belong to no labelled collection of
# ecgvlm's: they read as generic WFDB records, with the same samples as wfdb's own reading.
GENERIC_STAGED_FOLDERS = ("ludb", "qtdb")


# ------------------------------------------------------------------------------------------
# Real records


@pytest.fixture(scope="module")
def staged_records(shared_ecg_dir):
    failures: list[S.ReadFailure] = []
    records = list(S.iter_records(shared_ecg_dir, window_s=None, failures=failures))
    return records, failures


def test_every_staged_record_reads(shared_ecg_dir, staged_records):
    records, failures = staged_records
    assert failures == []
    n_headers = len(list(shared_ecg_dir.rglob("*.hea")))
    assert len(records) == n_headers == 125
    by_id = {r.record_id: r for r in records}
    folders = [*STAGED_DATASETS.items(), *((f, "wfdb") for f in GENERIC_STAGED_FOLDERS)]
    for folder, key in folders:
        for hea in sorted((shared_ecg_dir / folder).glob("*.hea")):
            rec = by_id[f"{key}/{hea.stem}"]
            assert rec.dataset == key
            assert rec.signal_mv.dtype == np.float32
            assert np.isfinite(rec.signal_mv).all()
            # Same samples (mV) as wfdb's own reading, leads matched by name.
            ref = wfdb.rdrecord(str(hea.with_suffix("")))
            assert rec.fs_hz == ref.fs and rec.n_samples == ref.sig_len
            for i, name in enumerate(ref.sig_name):
                got = rec.lead(S.standard_lead_name(name))
                np.testing.assert_allclose(got, ref.p_signal[:, i], atol=1e-4)
            if key in S.TWELVE_LEAD_DATASETS:
                assert rec.leads == S.STANDARD_LEADS
            assert not any(L.is_unknown(lab) for lab in rec.labels), rec.record_id


def test_staged_labels_equal_header_codes(shared_ecg_dir, staged_records):
    by_id = {r.record_id: r for r in staged_records[0]}
    n = 0
    for folder, key in STAGED_DATASETS.items():
        for hea in sorted((shared_ecg_dir / folder).glob("*.hea")):
            if key in ("mitdb", "ptbdb"):
                continue
            comments = wfdb.rdheader(str(hea.with_suffix(""))).comments
            dx = next(c for c in comments if c.strip().lower().startswith("dx"))
            codes = [c.strip() for c in dx.split(":", 1)[1].split(",")]
            rec = by_id[f"{key}/{hea.stem}"]
            assert rec.source_codes == tuple(codes)
            assert rec.labels == tuple(dict.fromkeys(L.canonical_label(key, c) for c in codes))
            n += 1
    assert n == 90
    # The AF trap on real headers: CPSC "AF" and Chapman 164889003 are fibrillation,
    # Chapman 164890007 (JS00005) is flutter.
    assert by_id["cpsc2018/A0003"].labels == ("AF",)
    assert by_id["chapman_shaoxing/JS00001"].labels[0] == "AF"
    assert by_id["chapman_shaoxing/JS00005"].labels[0] == "AFL"
    ptb = by_id["ptbdb/s0010_re"]
    assert ptb.labels == ("MI",) and len(ptb.leads) == 15 and ptb.fs_hz == 1000


def test_labels_from_the_header_alone_equal_the_read_records(shared_ecg_dir, staged_records):
    """prepare's scan takes labels from the header's comments (read_record_labels): for every
    staged record they are the labels, patient and id that read_record gives; MIT-BIH, whose
    labels need its annotations, has none (the scan reads it whole)."""
    checked = 0
    for rec in staged_records[0]:
        hea = next(shared_ecg_dir.rglob(f"{rec.record_id.split('/')[1]}.hea"))
        labelled = S.read_record_labels(hea.with_suffix(""))
        if rec.dataset == "mitdb":
            assert labelled is None
            continue
        assert labelled == S.RecordLabels(rec.record_id, rec.dataset, rec.labels,
                                          rec.patient_id), rec.record_id
        checked += 1
    assert checked == 125 - 4  # all but the 4 MIT-BIH records


def test_staged_metadata_and_patients(staged_records):
    by_id = {r.record_id: r for r in staged_records[0]}
    a1 = by_id["cpsc2018/A0001"]
    assert a1.meta["age"] == 74 and a1.meta["sex"] == "Male"
    assert a1.patient_id == "cpsc2018/A0001"
    assert by_id["ptbxl/HR06000"].patient_id is None  # PTB-XL headers drop the patient id
    assert by_id["mitdb/106"].patient_id == "mitdb/106"
    assert by_id["mitdb/202"].patient_id == "mitdb/201"  # same patient as 201
    assert (by_id["mitdb/202"].meta["age"], by_id["mitdb/202"].meta["sex"]) == (68, "Male")


def _rhythm_episodes(ann, n_samples):
    changes = [
        (int(s), a.replace("\x00", "").strip())
        for s, sym, a in zip(ann.sample, ann.symbol, ann.aux_note)
        if sym == "+"
    ]
    ends = [s for s, _ in changes[1:]] + [n_samples]
    return [(s, e, a) for (s, a), e in zip(changes, ends)]


@pytest.fixture(scope="module")
def mitdb_dir(samples_dir):
    return samples_dir / "mitdb"


@pytest.mark.parametrize("number", ["106", "202"])
def test_mitdb_windows_match_annotations(mitdb_dir, number):
    path = mitdb_dir / number
    windows = S.read_windows(path, window_s=10.0)
    header = wfdb.rdheader(str(path))
    ann = wfdb.rdann(str(path), "atr")
    n = 3600
    assert len(windows) == header.sig_len // n == 180
    episodes = _rhythm_episodes(ann, header.sig_len)
    beat_syms = np.array(ann.symbol)
    samples = np.array(ann.sample)
    for k, w in enumerate(windows):
        start, end = k * n, (k + 1) * n
        assert w.record_id == f"mitdb/{number}@{k * 10}s"
        assert w.start_s == k * 10.0 and w.n_samples == n and w.leads[0] == "MLII"
        in_win = beat_syms[(samples >= start) & (samples < end)]
        # PVC exactly where the annotations put a V beat.
        assert ("PVC" in w.labels) == ("V" in in_win), w.record_id
        assert ("PAC" in w.labels) == bool({"A", "a"} & set(in_win)), w.record_id
        counts = Counter(s for s in in_win if L.is_beat(s))
        assert w.meta["beat_counts"] == dict(counts)
        rhythms = {a for s, e, a in episodes if s < end and e > start}
        assert ("NSR" in w.labels) == ("(N" in rhythms)
        assert ("AF" in w.labels) == ("(AFIB" in rhythms), w.record_id
        assert ("AFL" in w.labels) == ("(AFL" in rhythms), w.record_id
        assert ("VBig" in w.labels) == ("(B" in rhythms)
        assert w.labels[: len(rhythms)] == tuple(
            L.canonical_label("mitdb", a)
            for a in dict.fromkeys(a for s, e, a in episodes if s < end and e > start)
        )
    np.testing.assert_allclose(
        windows[3].signal_mv,
        wfdb.rdrecord(str(path), sampfrom=3 * n, sampto=4 * n).p_signal,
        atol=1e-5,
    )


def test_mitdb_106_and_202_episodes(mitdb_dir):
    w106 = S.read_windows(mitdb_dir / "106")
    pvc = [w for w in w106 if "PVC" in w.labels]
    assert 0 < len(pvc) < len(w106)
    assert sum(w.meta["beat_counts"].get("V", 0) for w in w106) <= 520
    w202 = S.read_windows(mitdb_dir / "202")
    afl = [w.start_s for w in w202 if "AFL" in w.labels]
    af = [w.start_s for w in w202 if "AF" in w.labels]
    # 202: flutter from 549793 to 567041 (1527.2 s to 1575.1 s), fibrillation around it.
    assert afl == [1520.0, 1530.0, 1540.0, 1550.0, 1560.0, 1570.0]
    assert af and min(af) == 1140.0 and max(af) == 1790.0
    only_flutter = [w for w in w202 if w.labels[0] == "AFL" and "AF" not in w.labels]
    assert [w.start_s for w in only_flutter] == [1530.0, 1540.0, 1550.0, 1560.0]


def test_mitdb_whole_record_and_window_lengths(mitdb_dir):
    whole = S.read_record(mitdb_dir / "106")
    assert whole.n_samples == 650000 and whole.start_s == 0.0
    ann = wfdb.rdann(str(mitdb_dir / "106"), "atr")
    rhythms = {L.canonical_label("mitdb", a) for s, a in zip(ann.symbol, ann.aux_note) if s == "+"}
    beats = {L.beat_finding(s) for s in ann.symbol if L.is_beat(s)} - {None}
    assert set(whole.labels) == rhythms | beats == {"NSR", "VBig", "VTrig", "VTach", "PVC"}
    assert whole.meta["aami_counts"] == {"N": 1507, "V": 520}
    assert len(S.read_windows(mitdb_dir / "106", window_s=30)) == 60
    with pytest.raises(ValueError, match="window_s"):
        S.read_windows(mitdb_dir / "106", window_s=0)


def test_samples_all_read_and_cover_every_source(samples_dir):
    failures: list[S.ReadFailure] = []
    records = list(S.iter_records(samples_dir, failures=failures))
    assert failures == []
    assert {r.dataset for r in records} == set(L.DATASETS) - {"wfdb"}
    total = sum(f.stat().st_size for f in samples_dir.rglob("*") if f.is_file())
    assert total <= 10 * 1024 * 1024
    assert (samples_dir / "mitdb" / "106.atr").is_file()


# ------------------------------------------------------------------------------------------
# Helpers writing small records in the documented formats


def _sine_leads(n_samples: int, fs_hz: float, n_leads: int) -> np.ndarray:
    t = np.arange(n_samples) / fs_hz
    return np.stack([np.sin(2 * np.pi * (1 + i) * t) * (0.5 + 0.1 * i) for i in range(n_leads)], 1)


def _write_wfdb(folder: Path, name: str, signal: np.ndarray, leads, comments, fs=500) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * len(leads),
        sig_name=list(leads),
        p_signal=signal,
        fmt=["16"] * len(leads),
        adc_gain=[1000.0] * len(leads),
        baseline=[0] * len(leads),
        comments=comments,
        write_dir=str(folder),
    )
    return folder / name


def test_wfdb_leads_renamed_and_reordered(tmp_path):
    order = [5, 0, 1, 2, 3, 4, 6, 7, 8, 9, 11, 10]
    names = [S.STANDARD_LEADS[i].lower() for i in order]
    sig = _sine_leads(1000, 500, 12)
    path = _write_wfdb(tmp_path / "georgia", "E00001", sig, names, ["Dx: 426783006,999999"])
    rec = S.read_record(path)
    assert rec.leads == S.STANDARD_LEADS
    for col, idx in enumerate(order):
        np.testing.assert_allclose(rec.lead(S.STANDARD_LEADS[idx]), sig[:, col], atol=1e-3)
    # Unknown codes are kept, explicitly, next to the known ones.
    assert rec.labels == ("NSR", "UNK:999999")
    assert rec.source_codes == ("426783006", "999999")


def test_generic_wfdb_record_outside_known_datasets(tmp_path):
    # An upload or a user's own file: no known folder or name, any lead set, SNOMED Dx codes.
    path = _write_wfdb(tmp_path / "upload", "my_ecg", _sine_leads(800, 250, 3),
                       ["ii", "V5", "aVF"], ["Dx: 164889003,42"], fs=250)  # fmt: skip
    rec = S.read_record(path)
    assert rec.dataset == "wfdb" and rec.record_id == "wfdb/my_ecg"
    assert rec.leads == ("II", "V5", "aVF") and rec.fs_hz == 250
    assert rec.labels == ("AF", "UNK:42") and rec.patient_id is None


def test_cpsc_original_release(tmp_path):
    folder = tmp_path / "TrainingSet"
    folder.mkdir()
    data_mv = _sine_leads(3000, 500, 12).T  # the original stores 12 x n in mV
    savemat(folder / "A0007.mat", {"ECG": {"sex": "Female", "age": 61.0, "data": data_mv}})
    savemat(folder / "A0008.mat", {"ECG": {"sex": "Male", "age": 70.0, "data": data_mv}})
    (folder / "REFERENCE.csv").write_text(
        "Recording,First_label,Second_label,Third_label\nA0007,2,5,\nA0008,1,,\n"
    )
    rec = S.read_record(folder / "A0007", dataset="cpsc2018")
    assert rec.record_id == "cpsc2018/A0007" and rec.fs_hz == 500
    assert rec.labels == ("AF", "RBBB") and rec.source_codes == ("2", "5")
    assert rec.leads == S.STANDARD_LEADS and rec.signal_mv.shape == (3000, 12)
    np.testing.assert_allclose(rec.signal_mv, data_mv.T, atol=1e-6)
    assert rec.meta["age"] == 61 and rec.meta["sex"] == "Female"
    # Found by the walker too, dataset recognised from the record names.
    found = list(S.iter_records(folder, failures=[]))
    assert [r.labels for r in found] == [("AF", "RBBB"), ("NSR",)]
    assert [r.record_id for r in S.iter_records(folder / "A0008")] == ["cpsc2018/A0008"]
    # Bad inputs in this format.
    savemat(folder / "A0009.mat", {"ECG": {"sex": "Male", "age": 70.0, "data": data_mv[:11]}})
    with pytest.raises(S.LeadCountError, match="cpsc2018/A0009"):
        S.read_record(folder / "A0009")
    bad = data_mv.copy()
    bad[3, 100] = np.nan
    savemat(folder / "A0010.mat", {"ECG": {"sex": "Male", "age": 70.0, "data": bad}})
    with pytest.raises(S.NonFiniteSignalError, match="1 NaN/inf"):
        S.read_record(folder / "A0010")
    (folder / "REFERENCE.csv").unlink()
    with pytest.raises(S.MissingFileError, match="REFERENCE.csv"):
        S.read_record(folder / "A0007")


def test_chapman_original_release(tmp_path):
    root = tmp_path / "chapman"
    data = root / "ECGData"
    data.mkdir(parents=True)
    sig_uv = np.round(_sine_leads(5000, 500, 12) * 1000, 1)
    name = "MUSE_20180113_171327_27000"
    with (data / f"{name}.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(S.STANDARD_LEADS)
        w.writerows(sig_uv.tolist())
    (root / "Diagnostics.csv").write_text(
        "FileName,Rhythm,Beat,PatientAge,Gender,VentricularRate\n"
        f"{name},AF,RBBB TWC,85,MALE,117\n"
        "MUSE_20180112_073319_29000,AFIB,NONE,59,FEMALE,52\n"
    )
    rec = S.read_record(data / name)
    assert rec.record_id == f"chapman_shaoxing/{name}" and rec.fs_hz == 500
    # The trap: Chapman's AF is atrial flutter.
    assert rec.labels == ("AFL", "RBBB", "TAb") and rec.source_codes == ("AF", "RBBB", "TWC")
    np.testing.assert_allclose(rec.signal_mv, sig_uv / 1000, atol=1e-6)  # microvolts -> mV
    assert rec.meta["age"] == 85 and rec.meta["sex"] == "Male"
    assert [r.record_id for r in S.iter_records(root, failures=[])] == [rec.record_id]
    # A truncated export (fewer than 5000 rows) is reported as such.
    lines = (data / f"{name}.csv").read_text().splitlines()
    (data / "MUSE_20180112_073319_29000.csv").write_text("\n".join(lines[:2500]) + "\n")
    with pytest.raises(S.TruncatedSignalError, match="2499 samples"):
        S.read_record(data / "MUSE_20180112_073319_29000")


# ------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def cpsc_copy(tmp_path, shared_or_samples):
    folder = tmp_path / "cpsc2018"
    folder.mkdir()
    for f in (shared_or_samples / "cpsc2018").glob("A0002.*"):
        shutil.copy(f, folder)
    return folder / "A0002"


@pytest.fixture
def shared_or_samples(samples_dir):
    return samples_dir


def test_missing_files(tmp_path, cpsc_copy, mitdb_dir):
    with pytest.raises(S.MissingFileError, match="cpsc2018/A9999"):
        S.read_record(cpsc_copy.parent / "A9999")
    with pytest.raises(S.MissingFileError, match=f"{cpsc_copy.parent}: a folder, not a record: name one"):
        S.read_record(cpsc_copy.parent)
    Path(f"{cpsc_copy}.mat").unlink()
    with pytest.raises(S.MissingFileError, match=r"cpsc2018/A0002: signal file .*A0002\.mat"):
        S.read_record(cpsc_copy)
    folder = tmp_path / "mitdb"
    folder.mkdir()
    for ext in ("hea", "dat"):
        shutil.copy(mitdb_dir / f"106.{ext}", folder)
    with pytest.raises(S.MissingFileError, match=r"mitdb/106: reference annotation file"):
        S.read_record(folder / "106")


def test_truncated_signal(tmp_path, cpsc_copy):
    mat = Path(f"{cpsc_copy}.mat")
    data = mat.read_bytes()
    mat.write_bytes(data[: len(data) - 1000])
    with pytest.raises(S.TruncatedSignalError, match="cpsc2018/A0002: A0002.mat has"):
        S.read_record(cpsc_copy)
    # The same in format 16 .dat written by wfdb.
    path = _write_wfdb(tmp_path / "georgia", "E00002", _sine_leads(2000, 500, 12),
                       S.STANDARD_LEADS, ["Dx: 426783006"])  # fmt: skip
    dat = Path(f"{path}.dat")
    dat.write_bytes(dat.read_bytes()[:-24])
    with pytest.raises(S.TruncatedSignalError, match="georgia/E00002"):
        S.read_record(path)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda lines: ["A0002 twelve 500 5000", *lines[1:]], "HeaderError",
         "cannot parse header"),
        # Without the sample count wfdb takes it from the file's size, hiding truncation.
        (lambda lines: ["A0002 12 500", *lines[1:]], "HeaderError",
         "header gives no number of samples"),
        (lambda lines: ["A0002 0 500 5000"], "LeadCountError", "header lists no signals"),
        (lambda lines: lines[:6], "HeaderError", "header says 12 signals but has 5 signal lines"),
        (lambda lines: [lines[0], "A0002.mat 16+24 1000/mV", *lines[2:]], "HeaderError",
         "signal 0 has no description"),
    ],
    ids=["record-line", "no-sample-count", "no-signals", "missing-signal-lines", "unnamed-lead"],
)
def test_bad_headers_are_named(cpsc_copy, edit, error, message):
    hea = Path(f"{cpsc_copy}.hea")
    hea.write_text("\n".join(edit(hea.read_text().splitlines())) + "\n")
    with pytest.raises(getattr(S, error), match=f"cpsc2018/A0002: {message}"):
        S.read_record(cpsc_copy)


def test_checksum_mismatch(cpsc_copy):
    mat = Path(f"{cpsc_copy}.mat")
    data = bytearray(mat.read_bytes())
    data[24 + 2 * 12 * 100] ^= 0x5A  # one byte of sample 100, lead I (after the 24-byte header)
    mat.write_bytes(bytes(data))
    with pytest.raises(S.ChecksumMismatchError, match=r"cpsc2018/A0002: signal 0 \(I\) checksum"):
        S.read_record(cpsc_copy)


def test_nan_and_inf_samples(tmp_path):
    sig = _sine_leads(1000, 500, 12)
    sig[10, 3] = np.nan
    path = _write_wfdb(tmp_path / "georgia", "E00003", sig, S.STANDARD_LEADS, ["Dx: 426783006"])
    with pytest.raises(S.NonFiniteSignalError, match=r"georgia/E00003: 1 NaN/inf .*aVR: 1"):
        S.read_record(path)
    # A float-valued .mat (original CPSC layout) can hold inf itself.
    folder = tmp_path / "cpsc"
    folder.mkdir()
    data = _sine_leads(1000, 500, 12).T
    data[0, :5] = np.inf
    savemat(folder / "A0100.mat", {"ECG": {"sex": "Male", "age": 50.0, "data": data}})
    (folder / "REFERENCE.csv").write_text("Recording,First_label\nA0100,1\n")
    with pytest.raises(S.NonFiniteSignalError, match="5 NaN/inf"):
        S.read_record(folder / "A0100", dataset="cpsc2018")


def test_wrong_lead_count(tmp_path, mitdb_dir):
    path = _write_wfdb(
        tmp_path / "georgia", "E00004", _sine_leads(1000, 500, 11), S.STANDARD_LEADS[:11], []
    )
    with pytest.raises(S.LeadCountError, match="georgia/E00004: georgia records have the 12"):
        S.read_record(path)
    three = _write_wfdb(tmp_path / "mitdb", "300", _sine_leads(3600, 360, 3), ["MLII", "V1", "V5"],
                        [], fs=360)  # fmt: skip
    shutil.copy(mitdb_dir / "106.atr", tmp_path / "mitdb" / "300.atr")
    with pytest.raises(S.LeadCountError, match="mitdb/300"):
        S.read_record(three)


def test_errors_are_value_errors_naming_record_and_picklable(tmp_path):
    (tmp_path / "mystery.mat").write_bytes(b"")
    with pytest.raises(S.HeaderError, match="cannot tell which dataset") as info:
        S.read_record(tmp_path / "mystery")
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, S.EcgReadError)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is S.HeaderError and str(again) == str(err)
    with pytest.raises(S.MissingFileError) as missing:
        S.read_record(tmp_path / "nothing")
    assert isinstance(missing.value, FileNotFoundError)
    assert missing.value.filename == f"{tmp_path / 'nothing'}.hea"
    assert pickle.loads(pickle.dumps(missing.value)).filename == missing.value.filename
    for cls in (S.MissingFileError, S.TruncatedSignalError, S.ChecksumMismatchError,
                S.NonFiniteSignalError, S.LeadCountError, S.HeaderError):  # fmt: skip
        assert issubclass(cls, S.EcgReadError)


def test_iter_records_keeps_going_and_reports_failures(tmp_path, cpsc_copy, samples_dir):
    folder = cpsc_copy.parent
    for f in (samples_dir / "cpsc2018").glob("A0003.*"):
        shutil.copy(f, folder)
    for f in (samples_dir / "cpsc2018").glob("A0010.*"):
        shutil.copy(f, folder)
    mat = folder / "A0003.mat"
    mat.write_bytes(mat.read_bytes()[:500])
    failures: list[S.ReadFailure] = []
    got = list(S.iter_records(tmp_path, failures=failures))
    assert [r.record_id for r in got] == ["cpsc2018/A0002", "cpsc2018/A0010"]
    assert len(failures) == 1 and failures[0].path.endswith("A0003")
    assert isinstance(failures[0].error, S.TruncatedSignalError)
    with pytest.warns(UserWarning, match="cpsc2018/A0003"):
        assert len(list(S.iter_records(tmp_path))) == 2


# ------------------------------------------------------------------------------------------
# Resampling


def test_resample_keeps_frequency_and_labels(samples_dir):
    rec = S.read_record(samples_dir / "cpsc2018" / "A0003")
    t = np.arange(5000) / 500
    tone = np.repeat((np.sin(2 * np.pi * 7 * t))[:, None], 12, axis=1)
    from dataclasses import replace

    probe = replace(rec, signal_mv=tone)
    for fs in (250.0, 360.0, 1000.0):
        out = S.resample(probe, fs)
        assert out.fs_hz == fs and out.n_samples == round(5000 * fs / 500)
        assert out.signal_mv.dtype == np.float32
        spectrum = np.abs(np.fft.rfft(out.signal_mv[:, 0]))
        peak_hz = np.argmax(spectrum) * fs / out.n_samples
        assert abs(peak_hz - 7.0) < 0.11
        assert out.labels == rec.labels and out.meta["resampled_from_hz"] == 500
    assert S.resample(rec, 500) is rec
    with pytest.raises(ValueError, match="fs_hz must be > 0"):
        S.resample(rec, 0)

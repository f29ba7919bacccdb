"""`ecgvlm inspect` and `ecgvlm datasets summarize` on the bundled records."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import wfdb

from ecgvlm.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _field(out: str, name: str) -> str:
    match = re.search(rf"^{name}\s+(.*)$", out, re.MULTILINE)
    assert match, f"no {name!r} line in:\n{out}"
    return match.group(1)


def test_inspect_12_lead(samples_dir, capsys):
    assert main(["inspect", str(samples_dir / "cpsc2018" / "A0003")]) == 0
    out = capsys.readouterr().out
    assert _field(out, "record") == "cpsc2018/A0003"
    assert _field(out, "fs") == "500 Hz"
    assert _field(out, "duration") == "10.00 s (5000 samples)"
    assert _field(out, "leads").startswith("12: I, II, III, aVR, aVL, aVF, V1")
    assert re.search(r"^  AF\s+atrial fibrillation$", out, re.MULTILINE)


def test_inspect_mitdb_shows_beats_and_rhythms(samples_dir, capsys):
    assert main(["inspect", str(samples_dir / "mitdb" / "106")]) == 0
    out = capsys.readouterr().out
    assert _field(out, "leads") == "2: MLII, V1"
    assert _field(out, "aami counts") == "N 1507, V 520"
    for lab, name in [("NSR", "sinus rhythm"), ("VTach", "ventricular tachycardia"),
                      ("PVC", "premature ventricular contraction")]:  # fmt: skip
        assert re.search(rf"^  {lab}\s+{name}$", out, re.MULTILINE)


def test_inspect_bad_input_exits_2_naming_the_record(tmp_path, capsys):
    folder = tmp_path / "cpsc2018"
    folder.mkdir()
    assert main(["inspect", str(folder / "A0001")]) == 2
    err = capsys.readouterr().err
    assert "ecgvlm inspect: error: cpsc2018/A0001:" in err


def test_summarize_samples(samples_dir, capsys):
    assert main(["datasets", "summarize", str(samples_dir)]) == 0
    out = capsys.readouterr().out
    rows = {
        m.group(1): m.groups()[1:]
        for m in re.finditer(
            r"^(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+\s+(\d+)\s+(\d+)$", out, re.MULTILINE
        )
    }
    expected_12 = {
        folder.name.replace("-", ""): str(len(list(folder.glob("*.hea"))))
        for folder in samples_dir.iterdir()
        if folder.is_dir() and folder.name not in ("mitdb", "ptbdb")
    }
    for key, n in expected_12.items():
        assert rows[key][0] == rows[key][1] == n, key
    assert rows["mitdb"][:3] == ("360", "2", "2")  # 2 recordings x 180 windows of 10 s
    assert rows["ptbdb"][0] == "1"
    assert all(r[4] == "0" for r in rows.values())  # no unknown codes in the samples
    assert "failures: 0" in out
    assert re.search(
        r"^mitdb: records per label\n(.*\n)*?  AFL\s+6  atrial flutter$", out, re.MULTILINE
    )


def test_summarize_and_audit_of_a_folder_without_records_say_so(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no ECG here")
    for command in ("summarize", "audit"):
        assert main(["datasets", command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ecgvlm datasets: error: no records found under {tmp_path} "), err


def test_summarize_counts_unknowns_and_failures(tmp_path, samples_dir, capsys):
    folder = tmp_path / "georgia"
    folder.mkdir()
    for f in (samples_dir / "georgia").glob("E07506.*"):
        shutil.copy(f, folder)
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    sig = np.tile(np.sin(np.linspace(0, 20, 5000))[:, None], (1, 12))
    wfdb.wrsamp("E09999", fs=500, units=["mV"] * 12, sig_name=leads, p_signal=sig,
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12,
                comments=["Dx: 426783006,999999"], write_dir=str(folder))  # fmt: skip
    shutil.copy(folder / "E07506.hea", folder / "E07507.hea")  # header whose signal is absent
    (folder / "E07507.hea").write_text(
        (folder / "E07506.hea").read_text().replace("E07506", "E07507")
    )
    assert main(["datasets", "summarize", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^georgia\s+2\s+2\s+2\s+[\d.]+\s+2\s+1$", out, re.MULTILINE)
    assert re.search(r"^  NSR\s+2  sinus rhythm$", out, re.MULTILINE)
    assert re.search(r"^  UNK:999999\s+1  unknown code 999999$", out, re.MULTILINE)
    assert "failures: 1" in out
    assert re.search(r"E07507: MissingFileError: signal file .*E07507\.mat does not exist", out)


def test_inspect_does_not_import_torch_or_ray(samples_dir):
    code = (
        "import sys; from ecgvlm.cli import main; "
        f"assert main(['inspect', {str(samples_dir / 'georgia' / 'E07506')!r}]) == 0; "
        "bad = {'torch', 'ray'} & set(sys.modules); assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "NSR" in out.stdout


# --- errors: the CLI and every jobs/* entrypoint report them through report_user_errors ----


def _raise(error: BaseException):
    def run() -> int:
        raise error
    return run


def test_library_errors_are_one_line_with_status_2(capsys):
    import pytest

    from ecgvlm.cli import report_user_errors
    from ecgvlm.evaluate import EvaluationError

    # A RuntimeError subclass of the library's (a failed precondition), multi-line text.
    status = report_user_errors("evaluate", _raise(EvaluationError("split 'test' in\n/x selects no samples")))
    err = capsys.readouterr().err
    assert status == 2 and err == "ecgvlm evaluate: error: split 'test' in /x selects no samples\n"
    # A pydantic error (the serve config's): its messages and fields, not its input's dump.
    from ecgvlm.serving import ServeArgs

    status = report_user_errors("serve", lambda: ServeArgs(adapters={"a:b": "x"}))
    err = capsys.readouterr().err
    assert status == 2 and err == (
        "ecgvlm serve: error: adapters: name 'a:b' must be letters, digits, '.', '_' or '-'\n")
    report_user_errors("serve", lambda: ServeArgs(abstain_below="high", batching={"x": 1}))
    assert capsys.readouterr().err == (
        "ecgvlm serve: error: batching.x: Extra inputs are not permitted; abstain_below: Input "
        "should be a valid number, unable to parse string as a number\n")
    # Anything else is a bug: it keeps its traceback.
    with pytest.raises(RuntimeError, match="not ours"):
        report_user_errors("evaluate", _raise(RuntimeError("not ours")))
    with pytest.raises(KeyError):
        report_user_errors("evaluate", _raise(KeyError("bug")))


def test_ctrl_c_is_one_line_saying_how_to_resume_with_status_130(capsys):
    from ecgvlm.cli import _RESUME_HINTS, build_parser, report_user_errors

    assert report_user_errors("train", _raise(KeyboardInterrupt())) == 130
    # Before Ray has started, nothing of the run exists yet.
    assert capsys.readouterr().err == "ecgvlm train: interrupted; rerun the same command\n"
    # A command that knows better says so (``ecgvlm train`` names its run's state).
    assert report_user_errors("train", _raise(KeyboardInterrupt("rerun it so"))) == 130
    assert capsys.readouterr().err == "ecgvlm train: interrupted; rerun it so\n"
    # A command without a way to resume (serve stops itself on Ctrl-C) says only that.
    assert report_user_errors("inspect", _raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "ecgvlm inspect: interrupted\n"
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(_RESUME_HINTS) <= set(commands), set(_RESUME_HINTS) - set(commands)


def test_a_folder_that_cannot_be_written_is_one_line_naming_it(capsys):
    import errno

    import pytest

    from ecgvlm.cli import report_user_errors

    full = OSError(errno.ENOSPC, "No space left on device", "/data/prepared/train/part-3.parquet")
    assert report_user_errors("prepare", _raise(full)) == 2
    assert capsys.readouterr().err == (
        "ecgvlm prepare: error: [Errno 28] No space left on device: "
        "'/data/prepared/train/part-3.parquet'\n")
    # Other OS errors (a connection reset, a bug's EBADF) keep their traceback.
    with pytest.raises(ConnectionResetError):
        report_user_errors("prepare", _raise(ConnectionResetError(errno.ECONNRESET, "reset")))


def test_an_error_raised_in_a_ray_task_is_reported_as_its_cause(capsys):
    import traceback

    from ray.exceptions import RayTaskError

    from ecgvlm.cli import report_user_errors
    from ecgvlm.dataset import PrepareError

    try:
        raise PrepareError("no records found under data/nothing")
    except PrepareError as e:
        wrapped = RayTaskError("scan", traceback.format_exc(), e).as_instanceof_cause()
    assert "pid=" in str(wrapped) and "\n" in str(wrapped)  # what printing it whole would show
    assert report_user_errors("prepare", _raise(wrapped)) == 2
    assert capsys.readouterr().err == "ecgvlm prepare: error: no records found under data/nothing\n"

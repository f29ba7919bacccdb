"""/v1/ecg/interpret: ECG signals from JSON or WFDB uploads, checked, rendered and answered."""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ecgvlm.mcq import DEFAULT_QUESTION as MCQ_DEFAULT_QUESTION
from ecgvlm.serving.errors import bad_request, validation_error

logger = logging.getLogger("ray.serve")
from ecgvlm.serving.limits import (
    DEFAULT_WINDOW_S,
    MAX_FS_HZ,
    MAX_LEADS,
    MAX_OPTIONS,
    MIN_DURATION_S,
    MIN_FS_HZ,
    MIN_OPTIONS,
    PULSE_MODEL,
    ServeLimits,
)

#: Question asked when a client gives options but no question: the training set's wording
#: (``ecgvlm.mcq``), so a fine-tuned adapter is asked what it learned to answer.
DEFAULT_QUESTION = MCQ_DEFAULT_QUESTION
#: Largest |sample| accepted, in millivolts; bigger values are almost surely microvolts or
#: ADC counts sent by mistake.
MAX_ABS_MV = 50.0
#: Extensions accepted in a WFDB upload.
WFDB_UPLOAD_SUFFIXES = (".hea", ".dat", ".mat", ".atr")


class InterpretQuery(BaseModel):
    """What to ask about an ECG and with which model (the non-signal part of the request)."""

    model_config = ConfigDict(extra="forbid")

    model: str = PULSE_MODEL
    question: str | None = Field(None, min_length=1, max_length=2000)
    options: list[Annotated[str, Field(min_length=1, max_length=500)]] | None = Field(
        None, min_length=MIN_OPTIONS, max_length=MAX_OPTIONS
    )
    return_image: bool = False
    return_measurements: bool = True
    # How the printout is drawn (and shown to the model); auto: 3x4+II for 12 leads.
    layout: Literal["auto", "3x4+II", "6x2", "12x1"] = "auto"
    # P and T waves (PR, QT, QTc) cost ~10x the rest (0.49 s against 0.05 s per 12-lead 10 s
    # record on one core): asked for, not done for every request.
    measure_waves: bool = False
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    seed: int | None = None
    dataset: str | None = Field(None, min_length=1, max_length=40)
    start_s: float | None = Field(None, ge=0.0)
    duration_s: float | None = Field(None, gt=0.0)


class InterpretJsonRequest(InterpretQuery):
    """An ECG as JSON: ``samples`` of shape (n_samples, n_leads) in millivolts."""

    samples: list[list[float]]
    fs_hz: float
    leads: list[Annotated[str, Field(min_length=1, max_length=16)]] = Field(
        min_length=1, max_length=MAX_LEADS
    )
    record_id: str = Field("upload", min_length=1, max_length=200)


def parse_model(cls: type[BaseModel], data: Any) -> Any:
    """``cls.model_validate(data)``, with a 400 naming the field on failure."""
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from e


def check_query(query: InterpretQuery, limits: ServeLimits) -> tuple[str, list[str]]:
    """The question and options to ask; options are required (there is no default list)."""
    if query.options is None:
        raise bad_request(
            f"options is required: give {MIN_OPTIONS}-{MAX_OPTIONS} candidate findings "
            "(the answer is one of their letters)",
            param="options",
        )
    if query.max_tokens is not None and query.max_tokens > limits.max_tokens:
        raise bad_request(
            f"max_tokens is {query.max_tokens}; the limit is {limits.max_tokens}",
            param="max_tokens",
        )
    return query.question or DEFAULT_QUESTION, list(query.options)


def check_signal(
    signal: np.ndarray, fs_hz: float, leads: Sequence[str], limits: ServeLimits,
    param: str = "samples",
) -> None:
    """Check a signal's shape, rate, duration and values against the limits.

    Raises:
        ApiError: 400 naming the field: wrong shape, lead count mismatch, duplicate leads,
            fs_hz or duration out of range, NaN/inf, or values too large for millivolts.
    """
    if not MIN_FS_HZ <= fs_hz <= MAX_FS_HZ:
        raise bad_request(f"fs_hz must be in [{MIN_FS_HZ:g}, {MAX_FS_HZ:g}], got {fs_hz}",
                          param="fs_hz")
    if len(set(leads)) != len(leads):
        raise bad_request(f"leads has duplicate names: {list(leads)}", param="leads")
    if signal.ndim != 2 or signal.shape[1] != len(leads):
        raise bad_request(
            f"{param} must have shape (n_samples, n_leads) = (n, {len(leads)}) to match "
            f"leads {list(leads)}; got shape {tuple(signal.shape)}",
            param=param, code="invalid_shape",
        )
    duration_s = signal.shape[0] / fs_hz
    if not MIN_DURATION_S <= duration_s <= limits.max_duration_s:
        raise bad_request(
            f"{param} spans {duration_s:.2f} s at {fs_hz:g} Hz; it must span "
            f"{MIN_DURATION_S:g}-{limits.max_duration_s:g} s",
            param=param, code="invalid_duration",
        )
    bad = ~np.isfinite(signal)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        raise bad_request(
            f"{param} holds {int(bad.sum())} NaN or infinite value(s), the first at sample "
            f"{row} of lead {leads[col]!r}",
            param=param, code="non_finite",
        )
    peak = float(np.abs(signal).max())
    if peak > MAX_ABS_MV:
        raise bad_request(
            f"{param} must be in millivolts; its largest |value| is {peak:g}, over "
            f"{MAX_ABS_MV:g} mV (microvolts or ADC counts?)",
            param=param, code="invalid_units",
        )


def select_window(
    n_samples: int, fs_hz: float, start_s: float | None, duration_s: float | None,
    limits: ServeLimits, param: str = "samples",
) -> tuple[int, int]:
    """The ``[first, last)`` sample range to draw from a signal of ``n_samples``.

    A signal is drawn whole when it fits ``limits.max_duration_s`` and the request names no
    window. Otherwise the window starts at ``start_s`` (default 0) and lasts ``duration_s``
    (default ``DEFAULT_WINDOW_S``), cut at the signal's end; the window itself is then held
    to the duration limits like any signal.

    Raises:
        ApiError: 400 naming ``start_s`` when it is not inside the signal.
    """
    if not MIN_FS_HZ <= fs_hz <= MAX_FS_HZ:
        return 0, n_samples  # check_signal names fs_hz
    total_s = n_samples / fs_hz
    if start_s is None and duration_s is None and total_s <= limits.max_duration_s:
        return 0, n_samples
    first = round((start_s or 0.0) * fs_hz)
    if first >= n_samples:
        raise bad_request(
            f"start_s is {start_s:g}; {param} spans {total_s:.2f} s, so start_s must be "
            f"below that",
            param="start_s", code="invalid_window",
        )
    last = min(n_samples, first + round((duration_s or DEFAULT_WINDOW_S) * fs_hz))
    return first, last


def record_from_json(req: InterpretJsonRequest, limits: ServeLimits) -> Any:
    """An ``EcgRecord`` from a checked JSON signal."""
    from ecgvlm.records import EcgRecord

    n_values = sum(len(row) for row in req.samples)
    n_rows = len(req.samples)
    if n_rows == 0 or n_values != n_rows * len(req.samples[0]):
        raise bad_request(
            "samples must be a non-empty rectangular list of rows (n_samples, n_leads); "
            "its rows have different lengths" if n_rows else "samples must not be empty",
            param="samples", code="invalid_shape",
        )
    signal = np.asarray(req.samples, dtype=np.float64)
    first, last = select_window(len(signal), req.fs_hz, req.start_s, req.duration_s, limits)
    signal = signal[first:last]
    check_signal(signal, req.fs_hz, req.leads, limits)
    return EcgRecord(
        record_id=req.record_id, dataset="upload", signal_mv=signal.astype(np.float32),
        fs_hz=float(req.fs_hz), leads=tuple(req.leads), start_s=first / req.fs_hz,
    )


def safe_upload_name(name: str | None, param: str) -> str:
    """An uploaded file's base name, if it is a plain WFDB file name."""
    base = os.path.basename(name or "")
    if not base or base.startswith(".") or not all(c.isalnum() or c in "._-" for c in base):
        raise bad_request(f"{param}: file name {name!r} is not a plain file name",
                          param=param, code="invalid_upload")
    if not base.lower().endswith(WFDB_UPLOAD_SUFFIXES):
        raise bad_request(
            f"{param}: {base!r} is not a WFDB file; upload a .hea header and its "
            f"{'/'.join(WFDB_UPLOAD_SUFFIXES[1:])} signal file(s)",
            param=param, code="invalid_upload",
        )
    return base


def record_from_wfdb_upload(
    files: dict[str, bytes], limits: ServeLimits, dataset: str | None = None,
    start_s: float | None = None, duration_s: float | None = None,
) -> Any:
    """An ``EcgRecord`` from uploaded WFDB files: one ``.hea`` and its signal file(s).

    The files are written to a private temporary folder under their (checked) names and read
    with ``ecgvlm.signal.read_record``, so an upload is read exactly like a record on disk.
    A recording longer than ``limits.max_duration_s`` (or any, given ``start_s`` or
    ``duration_s``) is cut to the window ``select_window`` picks.

    Raises:
        ApiError: 400 naming ``files`` when the header is missing or doubled, a signal file
            it names was not uploaded, wfdb cannot read the files, or the signal breaks a
            limit.
    """
    import tempfile

    from ecgvlm.signal import detect_dataset, read_record

    headers = [n for n in files if n.lower().endswith(".hea")]
    if len(headers) != 1:
        raise bad_request(
            f"files: upload exactly one .hea header with its signal file(s); got {sorted(files)}",
            param="files", code="invalid_upload",
        )
    if len(files) < 2:
        raise bad_request(
            f"files: upload the signal file(s) ({'/'.join(WFDB_UPLOAD_SUFFIXES[1:])}) that "
            f"{headers[0]} names, not only the header",
            param="files", code="invalid_upload",
        )
    stem = headers[0][: -len(".hea")]
    if dataset is None and detect_dataset(stem) is None:
        from ecgvlm.labels import DATASETS

        raise bad_request(
            f"cannot tell which dataset {stem!r} comes from by its name (its labels are read "
            f"the dataset's way); send a dataset field, one of {', '.join(DATASETS)}",
            param="dataset",
        )
    with tempfile.TemporaryDirectory(prefix="ecgvlm-upload-") as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        try:
            record = read_record(os.path.join(tmp, stem), dataset=dataset)
        except FileNotFoundError as e:
            missing = os.path.basename(str(e.filename or e))
            raise bad_request(
                f"files: the header names a signal file that was not uploaded ({missing})",
                param="files", code="invalid_upload",
            ) from e
        except Exception as e:
            # wfdb raises many types on malformed input; all of them mean a bad upload.
            message = str(e).replace(tmp + os.sep, "").replace(tmp, "")
            raise bad_request(
                f"files: could not read the WFDB upload: {type(e).__name__}: {message}",
                param="files", code="invalid_upload",
            ) from e
    first, last = select_window(record.n_samples, record.fs_hz, start_s, duration_s, limits,
                                param="files")
    if (first, last) != (0, record.n_samples):
        from dataclasses import replace

        record = replace(record, signal_mv=record.signal_mv[first:last],
                         start_s=record.start_s + first / record.fs_hz)
    check_signal(record.signal_mv, record.fs_hz, record.leads, limits, param="files")
    return record


def measure_json(record: Any, waves: bool = False) -> dict[str, Any]:
    """The drawn window's measurements (``ecgvlm.measure``) as JSON: rate, rhythm, QRS,
    axis, ST and T per lead, and with ``waves`` the P/T-wave intervals (PR, QT, QTc); None
    values carry their reason in ``reasons``.

    ``measure_record`` never raises on bad signals; a bug that makes it raise still leaves the
    answer standing, with the measurements replaced by the error's name.
    """
    import math

    from ecgvlm.measure import MeasureConfig, measure_record

    try:
        data = measure_record(record, MeasureConfig(delineate_waves=waves)).to_dict()
    except Exception as e:  # the model's answer does not depend on it
        logger.exception("measuring %s failed", getattr(record, "record_id", "?"))
        return {"error": f"measurement failed ({type(e).__name__})"}

    def finite(value: Any) -> Any:  # JSON has no NaN
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [finite(v) for v in value]
        return value

    return finite(data)


def render_png(record: Any, layout: str = "auto") -> bytes:
    """The printout PULSE and GPT-4o are shown: ``layout``, where ``auto`` is 3x4+II for
    12 standard leads, else strips.

    Records with more leads than a strip page holds but not all 12 are drawn 3x4+II with the
    missing panels blank.

    Raises:
        ApiError: 400 naming ``leads`` when the record cannot be drawn.
    """
    from ecgvlm.render import RenderConfig, RenderError, render_printout

    try:
        return render_printout(record, RenderConfig(layout=layout)).png
    except RenderError as first:
        try:
            return render_printout(
                record, RenderConfig(layout="3x4+II", missing_leads="skip")
            ).png
        except RenderError:
            raise bad_request(f"leads: cannot draw this ECG: {first}", param="leads",
                              code="unrenderable") from first


def split_explanation(text: str, letter: str | None) -> str:
    """The reply without its leading answer statement ("The answer is B." / "B.")."""
    if letter is None:
        return text.strip()
    pattern = (
        r"^\s*(?:\**\s*(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\s*[:\-]?\s*)?"
        rf"(?:option\s+)?[(\[]?{letter}[)\]]?\**\s*[.:)\-]?\s*"
    )
    return re.sub(pattern, "", text, count=1, flags=re.IGNORECASE).strip()


def claims_json(explanation: str, measurements: dict[str, Any]) -> list[dict[str, Any]]:
    """Each checkable claim of ``explanation`` with its verdict against the measurements
    (``ecgvlm.evaluate.claims``; spans index into ``explanation``). A claim about a finding
    is unverifiable here: the record's labels are not known to the endpoint."""
    from ecgvlm.evaluate.claims import ClaimConfig, check_explanation, measurements_of

    measured = measurements_of(measurements)
    if measured is None:
        return []
    return [v.to_json() for v in check_explanation(explanation, measured, (), ClaimConfig())]


def interpret_response(
    model: str, text: str, question: str, options: Sequence[str], usage: dict[str, Any],
    png: bytes | None = None, window_s: tuple[float, float] | None = None,
    measurements: dict[str, Any] | None = None,
    choice_logprobs: Sequence[tuple[str, float]] | None = None, abstain_below: float = 0.0,
) -> dict[str, Any]:
    """The /v1/ecg/interpret answer: letter, finding, explanation (and the image if asked).

    ``window_s`` is the (start, duration) in seconds of the part of the signal drawn;
    ``measurements`` are that window's (:func:`measure_json`), when asked for.
    ``choice_logprobs``: each option letter's log-probability as a constrained choice; they
    give ``probabilities`` (letter -> probability, in letter order) and ``uncertain``, true
    when the most probable letter's probability is below ``abstain_below``.
    """
    from ecgvlm.prompt import letter_index, parse_answer

    letter = parse_answer(text, options)
    finding = options[letter_index(letter, len(options))] if letter else None
    out: dict[str, Any] = {
        "object": "ecg.interpretation",
        "model": model,
        "answer_letter": letter,
        "finding": finding,
        "explanation": split_explanation(text, letter),
        "text": text,
        "question": question,
        "options": list(options),
        "usage": usage,
    }
    if choice_logprobs is not None:
        import math

        probabilities = {c: math.exp(lp) for c, lp in sorted(choice_logprobs)}
        out["probabilities"] = probabilities
        out["uncertain"] = max(probabilities.values()) < abstain_below
        out["abstain_below"] = abstain_below
    if window_s is not None:
        out["start_s"], out["duration_s"] = window_s
    if measurements is not None:
        out["measurements"] = measurements
        out["claims"] = claims_json(out["explanation"], measurements)
    if png is not None:
        out["image_png_base64"] = base64.b64encode(png).decode("ascii")
    return out

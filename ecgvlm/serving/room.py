"""The reading room: one web page on the endpoint (``GET /``) to read an ECG with every
served model side by side.

The page is plain HTML, CSS and JavaScript shipped in the package (``static/``: no build
step, no CDN; it works offline). It calls the same API as any client, with the bearer token
the user gives once: ``GET /v1/models`` for the columns, ``GET /v1/ecg/samples`` for the
bundled records, ``POST /v1/ecg/interpret`` per model for the printout, the measurements, the
answer with its option probabilities and the explanation's claims checked against the
signal. This module holds what the gateway needs for that: the page with its settings, the
sample list, and a sample's files resolved safely.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ecgvlm.serving.errors import ApiError

#: Findings the page offers as options until the user edits them (the knowledge base's
#: option texts of the study's most common labels).
DEFAULT_FINDINGS: tuple[str, ...] = ("NSR", "AF", "RBBB", "LBBB")
#: Layouts the page offers (``InterpretQuery.layout``).
PAGE_LAYOUTS: tuple[str, ...] = ("auto", "3x4+II", "6x2", "12x1")
#: Most records the sample list shows.
MAX_SAMPLES = 500
#: Files of a record the page may fetch (what an upload to /v1/ecg/interpret takes).
SAMPLE_SUFFIXES: tuple[str, ...] = (".hea", ".dat", ".mat", ".atr")
_CONFIG_MARK = "/*ECGVLM_CONFIG*/null"


def default_samples_dir() -> str | None:
    """The repository's ``data/samples`` when ecgvlm runs from a checkout, else None."""
    candidate = Path(__file__).resolve().parents[2] / "data" / "samples"
    return str(candidate) if candidate.is_dir() else None


def page_settings(auth: bool) -> dict[str, Any]:
    """What the page starts from: the training set's question, default options, layouts,
    and whether the API wants a token."""
    from ecgvlm.knowledge import knowledge_base
    from ecgvlm.mcq import DEFAULT_QUESTION

    kb = knowledge_base()
    return {"question": DEFAULT_QUESTION,
            "options": [kb[label].option_text for label in DEFAULT_FINDINGS if label in kb],
            "layouts": list(PAGE_LAYOUTS), "auth": auth}


def page_html(auth: bool) -> str:
    """The page, its settings written into it (one JSON literal, no templating engine)."""
    text = resources.files("ecgvlm.serving").joinpath("static/reading_room.html").read_text()
    settings = json.dumps(page_settings(auth)).replace("</", "<\\/")
    return text.replace(_CONFIG_MARK, settings, 1)


def list_samples(root: str | None) -> list[dict[str, Any]]:
    """Records under ``root`` (``name``: the path without extension, relative to ``root``;
    ``files``: the record's files the page uploads), at most ``MAX_SAMPLES``."""
    if root is None or not Path(root).is_dir():
        return []
    from ecgvlm.signal import find_record_paths

    base = Path(root).resolve()
    out = []
    for path in find_record_paths(base)[:MAX_SAMPLES]:
        files = sorted(f.name for f in path.parent.glob(f"{path.name}.*")
                       if f.suffix in SAMPLE_SUFFIXES)
        if any(f.endswith(".hea") for f in files):  # uploads are WFDB: a header is needed
            out.append({"name": path.relative_to(base).as_posix(), "files": files})
    return out


def sample_file(root: str | None, name: str) -> Path:
    """The file ``name`` (``cpsc2018/A0002.hea``) under ``root``.

    Raises:
        ApiError: 404 when there are no samples or no such file; 400 for a name that leaves
            ``root`` or a file type the page never asks for.
    """
    if root is None:
        raise ApiError(404, "name: this endpoint offers no sample records (samples_dir)",
                       param="name", code="not_found")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path.suffix not in SAMPLE_SUFFIXES:
        raise ApiError(400, f"name: {name!r} is not a sample record's file (a .hea, .dat, .mat or "
                       ".atr under the samples folder)", param="name", code="invalid_name")
    if not path.is_file():
        raise ApiError(404, f"name: no sample file {name!r}", param="name", code="not_found")
    return path


# -- the second view: an evaluation's output directory ---------------------------------------

#: Most prediction rows one page of the browser returns.
MAX_ROWS = 200
#: Prediction columns the browser shows (``predictions.parquet``).
ROW_COLUMNS: tuple[str, ...] = ("sample_id", "dataset", "model", "answer_mode", "condition",
                                "true_label", "predicted_label", "predicted_letter",
                                "explanation", "claims", "error")


def _report_dir(report_dir: str | None) -> Path:
    if report_dir is None:
        raise ApiError(404, "report_dir: this endpoint was started without a report directory "
                       "(ecgvlm serve --report-dir DIR)", param="report_dir", code="not_found")
    root = Path(report_dir)
    if not (root / "report.md").is_file():
        raise ApiError(404, f"report_dir: {report_dir} holds no report.md (an evaluation's output_dir)",
                       param="report_dir", code="not_found")
    return root


def report_summary(report_dir: str | None) -> dict[str, Any]:
    """The report's markdown, its plots and the filters the prediction browser offers."""
    root = _report_dir(report_dir)
    rows = _predictions(root)
    return {"report_md": (root / "report.md").read_text(),
            "plots": sorted(p.name for p in root.glob("*.png")),
            "filters": {c: sorted(map(str, rows[c].unique())) for c in ("dataset", "model", "condition")},
            "n_predictions": len(rows)}


def _predictions(root: Path) -> Any:
    """``predictions.parquet`` with every browser column, ``claims`` parsed and each row's
    count of ``contradicted`` claims; read once per version of the file (the page asks for a
    page of rows at a time, an evaluation's rerun replaces the file)."""
    path = root / "predictions.parquet"
    if not path.is_file():
        raise ApiError(404, f"report_dir: {root} holds no predictions.parquet", param="report_dir",
                       code="not_found")
    stat = path.stat()
    return _read_predictions(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_predictions(path: str, mtime_ns: int, size: int) -> Any:
    """The browser's columns of ``path`` (``mtime_ns`` and ``size`` key the cache). An older
    run's file lacks some (``condition`` before the image controls, ``claims`` before the
    claim check): those read as the printout and as no claims."""
    import pandas as pd
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    frame = pd.read_parquet(path, columns=[c for c in ROW_COLUMNS if c in present])
    defaults = {"condition": "normal", "answer_mode": "generate", "claims": None,
                "explanation": "", "error": None, "predicted_letter": None}
    for column, value in defaults.items():
        if column not in frame.columns:
            frame[column] = value
    verdicts = [json.loads(c) if isinstance(c, str) and c else [] for c in frame["claims"]]
    return frame[list(ROW_COLUMNS)].assign(
        claims=verdicts,
        contradicted=[sum(v.get("verdict") == "contradicted" for v in vs) for vs in verdicts])


def report_plot(report_dir: str | None, name: str) -> Path:
    """One of the report's plots (a PNG at the top of the directory)."""
    root = _report_dir(report_dir)
    path = root / name
    if "/" in name or "\\" in name or path.suffix != ".png" or not path.is_file():
        raise ApiError(404, f"name: the report has no plot {name!r}", param="name", code="not_found")
    return path


def query_int(params: Mapping[str, str], name: str, default: int) -> int:
    """The integer query parameter ``name`` (``default`` when absent), or a 400 naming it."""
    value = params.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name,
                       code="invalid_query") from None


def report_predictions(
    report_dir: str | None, dataset: str | None = None, model: str | None = None,
    condition: str | None = None, correct: bool | None = None, contradicted: bool = False,
    offset: int = 0, limit: int = 50,
) -> dict[str, Any]:
    """Prediction rows matching the filters (``contradicted``: only explanations with a claim
    contradicted by the signal), ``limit`` of them from ``offset``, with the total."""
    frame = _predictions(_report_dir(report_dir))
    for column, value in (("dataset", dataset), ("model", model), ("condition", condition)):
        if value:
            frame = frame[frame[column] == value]
    if correct is not None:
        frame = frame[(frame["predicted_label"] == frame["true_label"]) == correct]
    if contradicted:
        frame = frame[frame["contradicted"] > 0]
    limit = max(1, min(int(limit), MAX_ROWS))
    page = frame.iloc[max(0, int(offset)): max(0, int(offset)) + limit]
    rows = json.loads(page.to_json(orient="records"))  # NaN -> null, numpy -> plain types
    return {"object": "list", "total": len(frame), "offset": int(offset), "data": rows}


def report_printout(report_dir: str | None, sample_id: str) -> bytes:
    """The printout of ``sample_id`` from the prepared split the evaluation read."""
    import pyarrow.dataset as pads
    import yaml

    root = _report_dir(report_dir)
    config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").is_file() else {}
    data_dir, split = config.get("data_dir"), config.get("split", "test")
    folder = Path(str(data_dir)) / str(split) if data_dir else None
    if folder is None or not folder.is_dir():
        raise ApiError(404, f"sample_id: the prepared split the report read ({folder}) is "
                       "not here",
                       param="sample_id", code="not_found")
    table = pads.dataset(str(folder), format="parquet").to_table(
        columns=["png"], filter=pads.field("sample_id") == sample_id)
    if not table.num_rows:
        raise ApiError(404, f"sample_id: no sample {sample_id!r} in {folder}", param="sample_id",
                       code="not_found")
    return table.column("png")[0].as_py()

"""The typed records that flow between pipeline stages.

EcgRecord -> Printout -> McqSample -> Prediction -> Judgement, as in DESIGN.md. Each stage is
a function from one record to the next. Dicts appear only where rows enter or leave Ray
Data, through each record's ``to_row``/``from_row``.

This module imports numpy only: data workers and the renderer must start fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class EcgRecord:
    """One ECG (or one window of a long recording), signals in millivolts.

    Attributes:
        record_id: Unique id ``"<dataset>/<name>"``, plus ``"@<start_s>s"`` for windows of a
            long recording (e.g. ``"mitdb/106@120s"``).
        dataset: Dataset key, e.g. ``"cpsc2018"``, ``"chapman_shaoxing"``, ``"mitdb"``.
        signal_mv: float32 array of shape ``(n_samples, n_leads)`` in millivolts.
        fs_hz: Sampling frequency in Hz.
        leads: Lead names, standard where the source is 12-lead (``I, II, III, aVR, aVL,
            aVF, V1..V6``); MIT-BIH keeps its own (``MLII, V1``...).
        labels: Canonical finding abbreviations (keys of ``ecgvlm.labels.FINDINGS``), plus
            explicit unknowns as ``"UNK:<raw code>"``.
        patient_id: Patient identifier where the source has one, else None.
        start_s: Offset of this window in the source recording, in seconds.
        source_codes: The label codes exactly as the source wrote them.
        meta: Free-form extra fields from the header (age, sex, ...), JSON-serialisable.
    """

    record_id: str
    dataset: str
    signal_mv: np.ndarray
    fs_hz: float
    leads: tuple[str, ...]
    labels: tuple[str, ...] = ()
    patient_id: str | None = None
    start_s: float = 0.0
    source_codes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        signal = np.asarray(self.signal_mv, dtype=np.float32)
        if signal.ndim != 2:
            raise ValueError(
                f"{self.record_id}: signal_mv must be 2-D (n_samples, n_leads), "
                f"got shape {signal.shape}"
            )
        if signal.shape[1] != len(self.leads):
            raise ValueError(
                f"{self.record_id}: signal has {signal.shape[1]} leads but leads names "
                f"{len(self.leads)}: {list(self.leads)}"
            )
        if not self.fs_hz > 0:
            raise ValueError(f"{self.record_id}: fs_hz must be > 0, got {self.fs_hz}")
        object.__setattr__(self, "signal_mv", signal)
        object.__setattr__(self, "leads", tuple(self.leads))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "source_codes", tuple(self.source_codes))

    @property
    def n_samples(self) -> int:
        return int(self.signal_mv.shape[0])

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs_hz

    def lead(self, name: str) -> np.ndarray:
        """Return one lead's samples (mV) by name; KeyError names the leads present."""
        try:
            return self.signal_mv[:, self.leads.index(name)]
        except ValueError:
            raise KeyError(f"{self.record_id} has no lead {name!r}; leads: {list(self.leads)}")


@dataclass(frozen=True)
class Panel:
    """Where one lead is drawn on a printout.

    A pixel maps back to (lead, seconds, millivolts): column ``box_px[0]`` shows
    ``t_start_s``; x advances ``px_per_mm * paper_speed_mm_s`` pixels per second;
    ``baseline_y_px`` is the row of 0 mV and y grows downwards by ``px_per_mm * mm_per_mv``
    pixels per millivolt.
    """

    lead: str
    box_px: tuple[int, int, int, int]
    baseline_y_px: float
    t_start_s: float
    t_end_s: float
    px_per_mm: float
    paper_speed_mm_s: float
    mm_per_mv: float

    @property
    def px_per_s(self) -> float:
        return self.px_per_mm * self.paper_speed_mm_s

    @property
    def px_per_mv(self) -> float:
        return self.px_per_mm * self.mm_per_mv


@dataclass(frozen=True)
class Printout:
    """A rendered ECG page: PNG bytes plus the geometry of every drawn lead."""

    png: bytes
    size_px: tuple[int, int]  # (width, height)
    px_per_mm: float
    panels: tuple[Panel, ...]
    layout: str = ""
    # Augmentations applied (in order); after "rotation" the panel geometry is approximate.
    augmentations: tuple[str, ...] = ()
    geometry_exact: bool = True

    def to_json(self) -> str:
        """Geometry only (no image bytes), for sanity checks and digitisers."""
        return json.dumps(
            {
                "size_px": list(self.size_px),
                "px_per_mm": self.px_per_mm,
                "layout": self.layout,
                "augmentations": list(self.augmentations),
                "geometry_exact": self.geometry_exact,
                "panels": [asdict(p) for p in self.panels],
            }
        )


@dataclass(frozen=True)
class McqSample:
    """One multiple-choice question about one ECG image.

    ``options[i]`` describes the finding ``option_labels[i]``; ``answer_index`` points at the
    correct one and ``answer_letter`` is its letter ("A", "B", ...). ``target_text`` is the
    training target, "The answer is X. <explanation>".
    """

    sample_id: str
    record_id: str
    dataset: str
    question: str
    options: tuple[str, ...]
    option_labels: tuple[str, ...]
    answer_index: int
    answer_letter: str
    target_text: str
    labels: tuple[str, ...]
    patient_id: str | None = None
    start_s: float = 0.0
    seed: int = 0
    png: bytes = b""

    def __post_init__(self) -> None:
        if len(self.options) != len(self.option_labels):
            raise ValueError(
                f"{self.sample_id}: {len(self.options)} options but "
                f"{len(self.option_labels)} option_labels"
            )
        if not 0 <= self.answer_index < len(self.options):
            raise ValueError(
                f"{self.sample_id}: answer_index {self.answer_index} outside "
                f"0..{len(self.options) - 1}"
            )

    @property
    def true_label(self) -> str:
        return self.option_labels[self.answer_index]

    def to_row(self) -> dict[str, Any]:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("options", "option_labels", "labels"):
            row[key] = list(row[key])
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> McqSample:
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in row.items() if k in names}
        for key in ("options", "option_labels", "labels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class Prediction:
    """One model's answer to one sample (one row of predictions.parquet)."""

    sample_id: str
    dataset: str
    model: str
    true_label: str
    answer_letter: str
    predicted_letter: str | None
    predicted_label: str | None
    explanation: str
    raw_text: str = ""
    error: str | None = None
    latency_s: float | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Prediction:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class Judgement:
    """An LLM judge's scores (1-5) of one explanation; ``hallucination`` is lower-better."""

    sample_id: str
    dataset: str
    model: str
    judge_model: str
    rubric_version: str
    factual_accuracy: int | None
    completeness: int | None
    detail_quality: int | None
    context_understanding: int | None
    hallucination: int | None
    rationale: str = ""
    failure: str | None = None
    attempts: int = 1
    latency_s: float | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Judgement:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

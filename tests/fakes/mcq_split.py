"""A tiny prepared MCQ split in the Parquet layout ``ecgvlm prepare`` writes (for tests/benchmarks).

Columns as in the prepare stage: sample_id, dataset, record_id, png (bytes), question, options,
option_labels, answer_index, answer_letter, target_text, labels. The question stem names the
sample id, so a fake endpoint can answer per sample.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# (label, option text, explanation); labels are ecgvlm.labels abbreviations but the last.
FINDINGS = (
    ("NSR", "Sinus rhythm", "Regular P-QRS-T at 60-100 bpm with normal intervals."),
    ("AF", "Atrial fibrillation", "Irregularly irregular RR intervals and no discernible P waves."),
    ("RBBB", "Right bundle branch block", "QRS >= 120 ms with rsR' in V1 and wide S in I and V6."),
    ("LBBB", "Left bundle branch block", "QRS >= 120 ms, broad notched R in I, aVL, V5-V6."),
    ("XYZ", "A finding the knowledge base lacks", "Explained by the target text only."),
)
LETTERS = "ABCD"


def tiny_png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# Measurements that fit each finding (the ``measurements`` column, as ``ecgvlm prepare``
# writes it): a rate, regular or irregular RR, a P wave before every beat or none, the QRS.
_FITTING = {
    "NSR": {"heart_rate_bpm": 75.0, "rr_irregularity": 0.03, "rr_irregular": False, "p_wave_fraction": 1.0, "qrs_ms": 92.0},
    "AF": {"heart_rate_bpm": 118.0, "rr_irregularity": 0.3, "rr_irregular": True, "p_wave_fraction": 0.1, "qrs_ms": 88.0},
    "RBBB": {"heart_rate_bpm": 70.0, "rr_irregularity": 0.03, "rr_irregular": False, "p_wave_fraction": 1.0, "qrs_ms": 142.0},
    "LBBB": {"heart_rate_bpm": 66.0, "rr_irregularity": 0.03, "rr_irregular": False, "p_wave_fraction": 1.0, "qrs_ms": 150.0},
    "XYZ": {"heart_rate_bpm": 80.0, "rr_irregularity": 0.03, "rr_irregular": False, "p_wave_fraction": 1.0, "qrs_ms": 96.0},
}


def fitting_measurements(label: str, record_id: str) -> str:
    """A ``Measurements`` JSON whose values fit ``label`` (see ``_FITTING``)."""
    import json

    return json.dumps({"record_id": record_id, "n_beats": 10, "leads": [], "reasons": {},
                       **_FITTING[label]})


def sample_rows(n_per_dataset: int, datasets=("cpsc2018", "mitdb"), seed: int = 0,
                png_size: tuple[int, int] = (64, 48), measurements: bool = False) -> list[dict]:
    """Rows of a seeded split: true label, options and answer position vary per sample
    (with ``measurements``: a ``measurements`` column fitting the true label)."""
    rng = np.random.default_rng(seed)
    rows = []
    for dataset in datasets:
        for i in range(n_per_dataset):
            sample_id = f"{dataset}/r{i:03d}#0"
            chosen = rng.choice(len(FINDINGS), size=len(LETTERS), replace=False)
            answer_index = int(rng.integers(0, len(LETTERS)))
            label, _, explanation = FINDINGS[chosen[answer_index]]
            letter = LETTERS[answer_index]
            rows.append({
                "sample_id": sample_id,
                "dataset": dataset,
                "record_id": f"{dataset}/r{i:03d}",
                "png": tiny_png(seed * 100_003 + i + 7919 * len(rows), png_size),
                "question": f"Which finding does ECG {sample_id} show?",
                "options": [FINDINGS[j][1] for j in chosen],
                "option_labels": [FINDINGS[j][0] for j in chosen],
                "answer_index": answer_index,
                "answer_letter": letter,
                "target_text": f"The answer is {letter}. {explanation}",
                "labels": [label],
            })
            if measurements:
                rows[-1]["measurements"] = fitting_measurements(label, f"{dataset}/r{i:03d}")
    return rows


def write_split(root: Path, rows: list[dict], split: str = "test", shards: int = 2) -> Path:
    """Write rows as ``<root>/<split>/part-<k>.parquet`` shards; return ``root``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(root) / split
    out.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        part = rows[k::shards]
        if part:
            pq.write_table(pa.Table.from_pylist(part), out / f"part-{k:03d}.parquet")
    return Path(root)


def write_report_dir(root: Path, rows: list[dict], models=("pulse", "pulse-lora")) -> Path:
    """A small evaluation output directory over ``rows`` (written as the test split under
    ``root/prepared``): ``report.md``, one plot, ``config.yaml`` naming the split, and
    ``predictions.parquet`` where ``pulse`` answers A and ``pulse-lora`` the correct letter,
    each explanation claiming a rate of 150 bpm (contradicted by the fitting measurements
    of every finding but AF, whose rate is 118)."""
    import json

    import pandas as pd
    import yaml

    root = Path(root)
    data_dir = write_split(root / "prepared", rows)
    out = root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("# Evaluation report\n\n## Table 1: classification\n")
    (out / "metrics_bars.png").write_bytes(tiny_png(1))
    (out / "config.yaml").write_text(yaml.safe_dump({"data_dir": str(data_dir), "split": "test"}))
    preds = []
    for r in rows:
        true = r["option_labels"][r["answer_index"]]
        for model in models:
            letter = "A" if model == "pulse" else r["answer_letter"]
            verdict = "supported" if true == "AF" else "contradicted"
            claims = [{"kind": "heart_rate", "value": 150.0, "span": [0, 15], "text": "rate is 150 bpm",
                       "verdict": verdict, "measured": 118.0 if true == "AF" else 75.0,
                       "rule": "within 10 bpm", "reason": ""}]
            preds.append({"sample_id": r["sample_id"], "dataset": r["dataset"], "model": model,
                          "answer_mode": "generate", "condition": "normal", "true_label": true,
                          "answer_letter": r["answer_letter"], "predicted_letter": letter,
                          "predicted_label": r["option_labels"][LETTERS.index(letter)],
                          "explanation": "rate is 150 bpm and regular.",
                          "claims": json.dumps(claims), "error": None})
    pd.DataFrame(preds).to_parquet(out / "predictions.parquet")
    return out

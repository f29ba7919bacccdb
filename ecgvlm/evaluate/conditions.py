"""The images a question is asked with, besides the prepared printout, and their comparison.

Every prediction carries a ``condition``: ``normal`` is the printout prepare drew. The others
answer two questions about a model:

* **Does it read the ECG?** The controls (``EvalConfig.controls``, :data:`CONTROLS`) take the
  ECG away: ``text_only`` asks the question with no image at all (what the language model
  alone gets); ``blank`` is the same page (layout, grid, lead labels, calibration pulses,
  caption) with no trace; ``mismatched`` is the printout of another sample of the data set
  whose correct finding is not among this question's options.
* **Is it robust to printout artefacts?** The sweep (``EvalConfig.robustness``,
  :class:`RobustnessConfig`) re-renders each sample's printout from its record's signal with
  one of the renderer's augmentations at one strength (condition ``"noise@1"``), or in the
  study's ``ecg_plot`` style, a different printer (condition ``"ecg_plot"``). The record is
  read again from the split's ``source_path`` inside the Ray Data pipeline, never on the
  driver; the augmentation is seeded per sample, so a rerun draws byte-identical images.

:func:`compare_conditions` pairs each condition's answers with the normal ones on the same
samples: accuracy, the paired difference with a cluster-bootstrap interval and, for
``choice`` answers, the expected calibration error.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ecgvlm.config import ConfigError, check_choice, check_range
from ecgvlm.render.config import AUGMENTATIONS

#: Image controls (``EvalConfig.controls``).
CONTROLS: tuple[str, ...] = ("text_only", "blank", "mismatched")
#: Sweep entries that are a whole printer style rather than an artefact with a strength.
PRINTERS: tuple[str, ...] = ("ecg_plot",)
#: What ``RobustnessConfig.artefacts`` may name: the renderer's augmentations and printers.
ARTEFACTS: tuple[str, ...] = (*AUGMENTATIONS, *PRINTERS)
#: The columns a question needs besides its image (what the pipeline reads and asks with).
ASKED_COLUMNS: tuple[str, ...] = (
    "sample_id", "dataset", "question", "options", "option_labels", "answer_letter",
)
#: The columns re-rendering needs besides those.
RERENDER_COLUMNS: tuple[str, ...] = ("record_id", "source_path")


@dataclass(frozen=True)
class RobustnessConfig:
    """The printout-artefact sweep: each entry is one more pass over the split.

    Attributes:
        artefacts: Augmentations of the renderer (``noise``, ``baseline_wander``,
            ``rotation``, ``blur``, ``jpeg``, ``tint``, ``grid_dropout``), each asked at every
            strength, and ``ecg_plot`` (the study's printer style, no strength).
        strengths: Multipliers of each augmentation's default magnitude (1.0: the training
            augmentation's; see ``ecgvlm.render.augment`` for what 1.0 means per artefact).
    """

    artefacts: tuple[str, ...] = ()
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0)

    def __post_init__(self) -> None:
        artefacts = (self.artefacts,) if isinstance(self.artefacts, str) else tuple(self.artefacts)
        for name in artefacts:
            check_choice("robustness.artefacts", name, ARTEFACTS)
        if len(set(artefacts)) != len(artefacts):
            raise ConfigError(f"robustness.artefacts must not repeat, got {list(artefacts)}")
        strengths = tuple(float(s) for s in self.strengths)
        for s in strengths:
            check_range("robustness.strengths", s, 0.01, 3.0)
        if len(set(strengths)) != len(strengths):
            raise ConfigError(f"robustness.strengths must not repeat, got {list(strengths)}")
        if any(a not in PRINTERS for a in artefacts) and not strengths:
            raise ConfigError("robustness.strengths must list at least one strength")
        object.__setattr__(self, "artefacts", artefacts)
        object.__setattr__(self, "strengths", tuple(sorted(strengths)))

    def conditions(self) -> tuple[str, ...]:
        """The sweep's condition names, in the order of ``artefacts`` then strength."""
        out: list[str] = []
        for artefact in self.artefacts:
            if artefact in PRINTERS:
                out.append(artefact)
            else:
                out += [condition_name(artefact, s) for s in self.strengths]
        return tuple(out)


def condition_name(artefact: str, strength: float) -> str:
    """``"noise@0.5"``: the condition of one artefact at one strength."""
    return f"{artefact}@{strength:g}"


def parse_condition(condition: str) -> tuple[str, float | None]:
    """(artefact, strength) of a sweep condition; the strength is None for a printer."""
    artefact, _, strength = condition.partition("@")
    check_choice("condition", artefact, ARTEFACTS)
    return artefact, (float(strength) if strength else None)


def sample_seed(seed: int, sample_id: str) -> int:
    """The seed of one sample's augmentation: stable across runs, machines and Python."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def prepared_sources(data_dir: str | Path) -> tuple[str, ...]:
    """The prepared set's source roots in object storage (``PrepareConfig.remote_roots``),
    which a re-render maps record URIs onto; none without a manifest."""
    from ecgvlm import storage

    manifest = storage.join(data_dir, "manifest.json")
    if not storage.is_file(manifest):
        return ()
    roots = [s["root"] for s in json.loads(storage.read_text(manifest)).get("sources") or ()]
    return tuple(r for r in roots if storage.local_path(r) is None)


def prepared_render(data_dir: str | Path) -> tuple[str, float]:
    """(the prepared set's render config as sorted JSON, its MIT-BIH ``window_s``), from its
    ``manifest.json``; without one, the defaults prepare would use."""
    from ecgvlm import storage

    manifest = storage.join(data_dir, "manifest.json")
    config: dict[str, Any] = {}
    if storage.is_file(manifest):
        config = json.loads(storage.read_text(manifest)).get("config") or {}
    render = config.get("render") or {"layout": "auto"}
    return json.dumps(render, sort_keys=True), float(config.get("window_s") or 10.0)


@functools.lru_cache(maxsize=64)
def _render_config(render_json: str, condition: str) -> Any:
    from ecgvlm.config import config_from_dict
    from ecgvlm.render.config import RenderConfig

    base = config_from_dict(RenderConfig, {**json.loads(render_json), "augment": False})
    if condition in ("normal", "blank"):
        return base
    artefact, strength = parse_condition(condition)
    if artefact in PRINTERS:
        return replace(base, style=artefact)
    return replace(base, augment=(artefact,), augment_strength=strength)


def lead_names(measurements: Any) -> tuple[str, ...]:
    """The leads of a record, from the split's ``measurements`` JSON (the 12 standard leads
    when it has none)."""
    from ecgvlm.evaluate.claims import measurements_of
    from ecgvlm.signal import STANDARD_LEADS

    m = measurements_of(measurements)
    return tuple(lm.lead for lm in m.leads) if m is not None and m.leads else STANDARD_LEADS


@functools.lru_cache(maxsize=16)
def blank_png(leads: tuple[str, ...], render_json: str) -> bytes:
    """The blank control's page for a record with ``leads`` (cached: one per lead set)."""
    from ecgvlm.render.printout import blank_printout

    return blank_printout(leads, _render_config(render_json, "blank")).png


def rerender_png(record: Any, condition: str, render_json: str, seed: int) -> bytes:
    """``record``'s printout in a sweep condition (``"noise@1"``, ``"ecg_plot"``), or as
    prepared (``"normal"``: byte-identical to the split's ``png`` when ``seed`` is the prepare
    seed). ``seed`` seeds the augmentation (:func:`sample_seed` of the sample)."""
    from ecgvlm.render.printout import render_printout

    return render_printout(record, _render_config(render_json, condition), seed=seed).png


def rerendered(
    rows: Sequence[dict[str, Any]], conditions: Sequence[str], render_json: str,
    window_s: float, seed: int, source_roots: Sequence[str] = (),
) -> dict[tuple[str, str], bytes]:
    """Each row's printout in each condition, keyed by (sample id, condition); every record
    is read once. Runs in the evaluation's Ray Data tasks.

    Raises:
        EvaluationError: a record cannot be read again (naming the sample and the path).
    """
    from ecgvlm.dataset import read_sample_record
    from ecgvlm.evaluate.errors import EvaluationError

    out: dict[tuple[str, str], bytes] = {}
    for row in rows:
        sid = str(row["sample_id"])
        try:
            record = read_sample_record(str(row["source_path"]), str(row["dataset"]),
                                        str(row["record_id"]), window_s, source_roots)
        except Exception as e:
            raise EvaluationError(
                f"cannot re-render {sid}: reading {row['source_path']} failed "
                f"({type(e).__name__}: {e})") from e
        for condition in conditions:
            out[(sid, condition)] = rerender_png(record, condition, render_json,
                                                 sample_seed(seed, sid))
    return out


def _missing_source(paths: Sequence[str]) -> str | None:
    """The first record path of which no file exists (the paths carry no extension)."""
    from ecgvlm import storage

    for p in sorted(set(paths)):
        if storage.local_path(p) is None:
            continue  # in an object store: read (and checked) from each node's copy
        path = Path(p)
        if not p or not path.parent.is_dir() or not any(path.parent.glob(f"{path.name}.*")):
            return p or "(empty)"
    return None


def condition_inputs(
    config: Any, meta: Any, files: Sequence[str], conditions: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, str]]:
    """What ``job.expand_pending`` needs for the controls and the sweep, from the split's
    metadata (driver side, no images, no signals) and, for the mismatched printouts, the
    recipients' questions from its shards ``files``.

    ``blank``: the prepared set's render config (``manifest.json``, drawn without
    augmentation); each page is drawn for its sample's leads where the batch is made.
    ``mismatched``: for each sample a donor of the same data set (seeded)
    whose correct finding is not among the sample's options: an Arrow table of the
    recipients' ``ASKED_COLUMNS`` and their ``donor``, in the order drawn (Arrow, not a dict
    per recipient: it is held through the run and handed to every task that makes batches).
    Sweep ``conditions``: the render config, ``window_s`` and seed; they need the split's
    ``source_path`` (prepared data sets older than it have none) and readable records.

    Returns:
        (keyword arguments of ``expand_pending``, notes on what could not be run and why
        under ``"controls"`` and ``"robustness"``; a sweep that cannot run leaves
        ``kwargs["sweep"]`` empty).
    """
    import numpy as np
    import pyarrow as pa

    from ecgvlm.dataset import read_shard_rows
    from ecgvlm.evaluate.claims import draw_donor

    render_json, window_s = prepared_render(config.data_dir)
    kwargs: dict[str, Any] = {"recipients": None, "render_json": render_json,
                              "window_s": window_s, "seed": config.seed, "sweep": (),
                              "source_roots": prepared_sources(config.data_dir)}
    notes: dict[str, str] = {}
    if "mismatched" in config.controls:
        rng = np.random.default_rng(config.seed)
        lonely = []
        ordered = sorted(
            zip(map(str, meta["sample_id"]), map(str, meta["dataset"]), meta["option_labels"],
                meta["answer_letter"]))
        pools: dict[str, dict[str, list[str]]] = {}  # data set -> true finding -> sample ids
        for sid, dataset, labels, letter in ordered:
            pools.setdefault(dataset, {}).setdefault(
                true_label_of({"option_labels": labels, "answer_letter": letter}), []).append(sid)
        donors: dict[str, str] = {}  # recipient -> donor, in the order drawn
        for sid, dataset, labels, _ in ordered:
            donor = draw_donor(pools[dataset], set(labels), rng)
            if donor is None:
                lonely.append(sid)
            else:
                donors[sid] = donor
        asked = read_shard_rows(files, ASKED_COLUMNS, donors)
        row_of = {sid: i for i, sid in enumerate(asked.column("sample_id").to_pylist())}
        asked = asked.take(pa.array([row_of[sid] for sid in donors], pa.int64()))
        kwargs["recipients"] = asked.append_column(
            "donor", pa.array(list(donors.values()), pa.string()))
        if lonely:
            notes["controls"] = (
                f"mismatched: {len(lonely)} sample(s) have no printout of their data set whose "
                f"finding is not among their options (e.g. {lonely[0]}); not asked")
    if conditions:
        if "source_path" not in meta.columns:
            notes["robustness"] = (
                "not run: the prepared set has no source_path column (it was prepared before "
                "ecgvlm stored where each record came from); run the prepare job again on the "
                "same output_dir to bring it up to date")
        elif (missing := _missing_source(
                [s if isinstance(s, str) else "" for s in meta["source_path"]])) is not None:
            notes["robustness"] = (f"not run: the record {missing} the prepared set was read "
                                   "from cannot be found here, and the sweep re-renders from it")
        else:
            kwargs["sweep"] = tuple(conditions)
    return kwargs, notes


def true_label_of(sample: dict[str, Any]) -> str:
    """The finding of a split row's correct option."""
    from ecgvlm.prompt import letter_index

    labels = list(sample["option_labels"])
    return str(labels[letter_index(str(sample["answer_letter"]), len(labels))])


def _ece(rows: Sequence[dict[str, Any]], n_bins: int) -> float | None:
    from ecgvlm.evaluate.calibration import (
        answers_of,
        confidence_and_correct,
        expected_calibration_error,
    )

    probs, answers, _, _ = answers_of(rows)
    if not len(answers):
        return None
    return expected_calibration_error(*confidence_and_correct(probs, answers), n_bins)


def compare_conditions(
    predictions: Any, mode: str, conditions: Sequence[str], clusters: Mapping[str, str],
    n_boot: int, seed: int, n_bins: int = 10,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Accuracy with the normal printout and in each condition, paired per sample.

    Returns:
        ``{model: {dataset: {"n_normal", "accuracy_normal", <condition>: {"n", "accuracy",
        "accuracy_normal" (on the same samples), "difference" (normal minus condition),
        "ci" (paired cluster-bootstrap interval of the difference, None from one
        cluster), "ece", "ece_normal" (``choice`` answers with probabilities, else
        None)}}}}``; a failed request counts wrong, as in Table 1.
    """
    from ecgvlm.evaluate.metrics import cluster_bootstrap_mean, cluster_ids

    out: dict[str, dict[str, dict[str, Any]]] = {}
    if not conditions:
        return out
    # Column-wise: a dict per prediction of every condition was most of this stage's memory.
    ece_columns = [c for c in ("option_probs", "answer_letter", "error")
                   if mode == "choice" and c in predictions]
    asked = predictions[predictions["answer_mode"] == mode]
    frame = asked[["sample_id", "model", "dataset", "condition", *ece_columns]].assign(
        hit=(asked["predicted_label"] == asked["true_label"]).to_numpy(dtype=bool))
    normal = frame[frame["condition"] == "normal"]
    for (model, dataset), rows in normal.groupby(["model", "dataset"], sort=False):
        out.setdefault(str(model), {})[str(dataset)] = {
            "n_normal": len(rows), "accuracy_normal": float(rows["hit"].mean())}

    def ece(rows: Any, suffix: str) -> float | None:
        if mode != "choice":
            return None
        values = zip(*(rows[c + suffix] for c in ece_columns))
        return _ece([dict(zip(ece_columns, v)) for v in values], n_bins)

    for condition in conditions:
        # Inner join in the normal rows' order: the samples asked both ways, as listed.
        paired = normal.merge(frame[frame["condition"] == condition], how="inner",
                              on=["sample_id", "model"], suffixes=("", "_c"))
        for (model, dataset), rows in paired.groupby(["model", "dataset"], sort=False):
            diffs = rows["hit"].to_numpy(dtype=float) - rows["hit_c"].to_numpy(dtype=float)
            groups = [clusters[str(s)] for s in rows["sample_id"]]
            ci = None
            if n_boot and len(set(cluster_ids(groups, len(groups)))) > 1:
                ci = cluster_bootstrap_mean(diffs.tolist(), groups, n_boot=n_boot, seed=seed)
            out[str(model)][str(dataset)][condition] = {
                "n": len(rows),
                "accuracy": float(rows["hit_c"].mean()),
                "accuracy_normal": float(rows["hit"].mean()),
                "difference": float(diffs.sum() / len(diffs)),
                "ci": ci,
                "ece": ece(rows, "_c"),
                "ece_normal": ece(rows, ""),
            }
    return out


def strength_curve(entries: dict[str, dict[str, Any]], artefact: str) -> list[tuple[float, float, int]]:
    """(strength, accuracy, n) of one artefact pooled over a model's data sets (the
    ``compare_conditions`` entries of one model), strength 0 being the normal printout."""
    points: dict[float, tuple[float, int]] = {}

    def add(strength: float, accuracy: float, n: int) -> None:
        n_correct, total = points.get(strength, (0.0, 0))
        points[strength] = (n_correct + accuracy * n, total + n)

    for entry in entries.values():
        swept = False
        for condition, c in entry.items():
            if isinstance(c, dict) and condition.partition("@")[0] == artefact and "@" in condition:
                add(float(condition.partition("@")[2]), c["accuracy"], c["n"])
                swept = True
        if swept:
            add(0.0, entry["accuracy_normal"], entry["n_normal"])
    return [(s, n_correct / n, n) for s, (n_correct, n) in sorted(points.items()) if n]

"""Multiple-choice questions about one ECG: one correct clinical description plus distractors.

``make_mcq(record, seed, config)`` picks the finding to ask about (by seed, among the record's
known findings), draws distractors from the knowledge base (a share of them "hard": findings
easily confused with the right one; never a finding the record carries or one that may hold
together with it), shuffles the option letters and writes the training target
"The answer is X. <explanation>".

Randomness comes from SHA-256 of (record id, seed, draw number) rather than ``random`` or
numpy generators, whose streams may change between versions: the same (record, seed,
config) gives the same question on every machine and Python version.

No torch or ray import: data workers call this.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ecgvlm.config import ConfigError, check_choice, check_range, config_to_dict
from ecgvlm.knowledge import FindingKnowledge, knowledge_base
from ecgvlm.labels import findings, is_unknown
from ecgvlm.prompt import LETTERS, format_target
from ecgvlm.records import EcgRecord, McqSample

if TYPE_CHECKING:
    from ecgvlm.measure import Measurements

MIN_OPTIONS = 4
MAX_OPTIONS = 8
OPTION_STYLES = ("summary", "name")
DEFAULT_QUESTION = "Which of the following best describes a finding in this ECG?"


class McqError(ValueError):
    """A record from which no question can be made (e.g. only unknown labels)."""


@dataclass(frozen=True)
class McqConfig:
    """How questions are made.

    Attributes:
        n_options: Options per question, correct one included (4-8).
        hard_fraction: Share of the distractors drawn from the correct finding's look-alikes
            (``confusable`` in the knowledge base); the rest are drawn at random. Where too few
            look-alikes are allowed, random ones fill in.
        option_style: ``"summary"``: "<Name>: <one sentence of criteria>"; ``"name"``: the
            finding's name only.
        question: The question stem.
        label_pool: Findings distractors may come from; empty means the whole knowledge base.
        contrast: Whether the explanation also says how the first hard distractor would look.
        grounded_targets: Where ``make_mcq`` is given the record's measurements and they meet
            the correct finding's criteria, the explanation cites them
            (``ecgvlm.measure.grounded_text``) instead of the generic description.
    """

    n_options: int = 4
    hard_fraction: float = 0.5
    option_style: str = "summary"
    question: str = DEFAULT_QUESTION
    label_pool: tuple[str, ...] = ()
    contrast: bool = True
    grounded_targets: bool = True

    def __post_init__(self) -> None:
        check_range("n_options", self.n_options, MIN_OPTIONS, MAX_OPTIONS)
        check_range("hard_fraction", self.hard_fraction, 0.0, 1.0)
        check_choice("option_style", self.option_style, OPTION_STYLES)
        if not self.question.strip():
            raise ConfigError("question must not be empty")
        unknown = sorted(set(self.label_pool) - set(knowledge_base()))
        if unknown:
            raise ConfigError(
                f"label_pool names findings without a knowledge entry: {', '.join(unknown)}"
            )

    @property
    def n_distractors(self) -> int:
        return self.n_options - 1

    def n_hard(self) -> int:
        """How many distractors are drawn from look-alikes (rounded half up)."""
        return int(self.n_distractors * self.hard_fraction + 0.5)

    def config_hash(self) -> str:
        """Short hash of the resolved config: part of a prepared data set's identity."""
        blob = json.dumps(config_to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


class _Draws:
    """A deterministic stream of integers from SHA-256, keyed by a string."""

    def __init__(self, key: str) -> None:
        self._key = key
        self._n = 0

    def below(self, n: int) -> int:
        """An integer in [0, n) (bias below 2**-200 for the small n used here)."""
        digest = hashlib.sha256(f"{self._key}\x1f{self._n}".encode()).digest()
        self._n += 1
        return int.from_bytes(digest, "big") % n

    def sample(self, items: list[str], k: int) -> list[str]:
        """``k`` distinct items in drawn order (a partial Fisher-Yates shuffle)."""
        pool = list(items)
        out = []
        for _ in range(min(k, len(pool))):
            out.append(pool.pop(self.below(len(pool))))
        return out


def known_findings(record: EcgRecord) -> list[str]:
    """The record's labels that the knowledge base describes, in the record's order."""
    kb = knowledge_base()
    return [label for label in record.labels if label in kb]


def _allowed_distractors(record: EcgRecord, correct: str, pool: list[str]) -> list[str]:
    """Findings from ``pool`` that are certainly wrong answers for this record."""
    kb = knowledge_base()
    held = set(record.labels)
    excluded = set(held) | {correct}
    for label in held | {correct}:
        if label in kb:
            excluded |= set(kb[label].overlaps)
    allowed = []
    for abbrev in pool:
        if abbrev in excluded:
            continue
        only_with = kb[abbrev].distractor_only_with
        if only_with and not held & set(only_with):
            continue
        allowed.append(abbrev)
    return allowed


def option_text(entry: FindingKnowledge, style: str) -> str:
    """The text of an option describing ``entry``."""
    return entry.option_text if style == "summary" else entry.name


def explain(
    correct: str,
    record: EcgRecord,
    config: McqConfig,
    contrast_with: str | None = None,
    measurements: Measurements | None = None,
) -> str:
    """The explanation that follows "The answer is X." in the training target.

    It states the criteria of the correct finding (or, with ``grounded_targets`` and
    measurements that meet them, the record's own values), optionally the key features the
    first hard distractor would show instead, and the record's other labelled findings.
    """
    kb = knowledge_base()
    grounded = None
    if config.grounded_targets and measurements is not None:
        from ecgvlm.measure.text import grounded_text

        grounded = grounded_text(correct, measurements)
    parts = [grounded or kb[correct].description]
    if config.contrast and contrast_with is not None:
        features = list(kb[contrast_with].key_features)
        listed = features[0] if len(features) == 1 else ", ".join(features[:-1]) + " and " + features[-1]
        # No option letter here: a reply that copies this sentence must still parse as the
        # answer it states first.
        parts.append(f"By contrast, {findings()[contrast_with].name} would show {listed}.")
    others = [findings()[label].name for label in known_findings(record) if label != correct]
    if others:
        parts.append(f"Also labelled in this ECG: {', '.join(others)}.")
    return " ".join(parts)


def make_mcq(
    record: EcgRecord,
    seed: int,
    config: McqConfig | None = None,
    measurements: Measurements | None = None,
) -> McqSample:
    """Make one multiple-choice question about ``record``.

    Args:
        record: The ECG with canonical labels.
        seed: Picks the finding asked about (for multi-label records), the distractors and the
            answer's position; the same (record, seed, config) always gives the same sample.
        config: How many options, how many hard distractors, option wording.
        measurements: ``ecgvlm.measure.measure_record(record)``, for grounded targets; None
            keeps the generic explanation.

    Returns:
        An McqSample without image bytes (the prepare job adds the PNG).

    Raises:
        McqError: the record has no label the knowledge base describes (none at all, or only
            explicit unknowns ``"UNK:..."``), or too few findings are left for distractors.
    """
    config = config or McqConfig()
    kb = knowledge_base()
    known = known_findings(record)
    if not known:
        unknown = [label for label in record.labels if is_unknown(label)]
        what = f"only unknown codes {unknown}" if unknown else f"labels {list(record.labels)}"
        raise McqError(f"{record.record_id}: no finding to ask about ({what})")

    draws = _Draws(f"{record.record_id}\x1f{seed}")
    correct = known[draws.below(len(known))]
    pool = sorted(config.label_pool or kb)
    allowed = _allowed_distractors(record, correct, pool)
    if len(allowed) < config.n_distractors:
        raise McqError(
            f"{record.record_id}: only {len(allowed)} findings can be distractors for "
            f"{correct}, need {config.n_distractors} (widen label_pool or lower n_options)"
        )
    hard_pool = [c for c in kb[correct].confusable if c in allowed]
    hard = draws.sample(hard_pool, config.n_hard())
    rest = [a for a in allowed if a not in hard]
    distractors = hard + draws.sample(rest, config.n_distractors - len(hard))

    answer_index = draws.below(config.n_options)
    shuffled = draws.sample(distractors, len(distractors))
    option_labels = shuffled[:answer_index] + [correct] + shuffled[answer_index:]
    options = [option_text(kb[label], config.option_style) for label in option_labels]
    letter = LETTERS[answer_index]
    explanation = explain(
        correct, record, config, contrast_with=hard[0] if hard else None, measurements=measurements
    )
    return McqSample(
        sample_id=f"{record.record_id}#q{seed}",
        record_id=record.record_id,
        dataset=record.dataset,
        question=config.question,
        options=tuple(options),
        option_labels=tuple(option_labels),
        answer_index=answer_index,
        answer_letter=letter,
        target_text=format_target(letter, explanation),
        labels=tuple(record.labels),
        patient_id=record.patient_id,
        start_s=float(record.start_s),
        seed=int(seed),
    )

"""Multiple-choice questions about one ECG: one correct clinical description plus distractors.

``make_mcq(record, seed, config, prevalence)`` picks the finding to ask about (by seed, among
the record's known findings), draws distractors (never a finding the record carries or one
that may hold together with it), shuffles the option letters and writes the training target
"The answer is X. <explanation>".

Distractors are **prior-balanced** by default (``distractors="prior_balanced"``): drawn from
the data set's own findings with probability proportional to how often each is the asked
finding (``prevalence``: :func:`finding_prevalence`'s shares, or the weights prepare
calibrates with :func:`calibrate_distractor_weights`), so a correct answer and a distractor
are a priori about equally likely to name any given finding, and choosing the most frequent
offered finding without looking at the ECG scores near chance. The study's style
(``distractors="knowledge_base"`` with ``hard_fraction=0.5``) draws from the whole knowledge
base, half of them look-alikes of the correct finding; there the frequent true findings
stand out among rare distractors and a blind guesser passes (docs/evaluate.md has the
numbers). A share of look-alikes (``hard_fraction``) is available in both styles.

Randomness comes from SHA-256 of (record id, seed, draw number) rather than ``random`` or
numpy generators, whose streams may change between versions: the same (record, seed,
config) gives the same question on every machine and Python version.

No torch or ray import: data workers call this.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ecgvlm.config import ConfigError, check_choice, check_range, config_to_dict
from ecgvlm.knowledge import FindingKnowledge, knowledge_base
from ecgvlm.labels import findings, is_unknown
from ecgvlm.prompt import LETTERS, format_target
from ecgvlm.records import EcgRecord, McqSample

if TYPE_CHECKING:
    from ecgvlm.measure import Measurements
    from ecgvlm.signal import RecordLabels

MIN_OPTIONS = 4
MAX_OPTIONS = 8
OPTION_STYLES = ("summary", "name")
DISTRACTOR_STYLES = ("prior_balanced", "knowledge_base")
DEFAULT_QUESTION = "Which of the following best describes a finding in this ECG?"


class McqError(ValueError):
    """A record from which no question can be made (e.g. only unknown labels)."""


@dataclass(frozen=True)
class McqConfig:
    """How questions are made.

    Attributes:
        n_options: Options per question, correct one included (4-8).
        distractors: ``"prior_balanced"``: the rest of the distractors are drawn from the data
            set's own findings, weighted by their prevalence as asked findings (the
            ``prevalence`` given to ``make_mcq``; findings outside it fill in only when too
            few are allowed; without a ``prevalence`` every finding in the pool weighs the
            same); ``"knowledge_base"``: drawn uniformly from the pool (the study's style).
        hard_fraction: Share of the distractors drawn from the correct finding's look-alikes
            (``confusable`` in the knowledge base; in ``prior_balanced`` style only those the
            data set has); the rest are drawn as ``distractors`` says. Where too few
            look-alikes are allowed, the others fill in. Look-alikes are chosen by the
            correct answer, so a non-zero share lets a blind guesser narrow the options.
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
    distractors: str = "prior_balanced"
    hard_fraction: float = 0.0
    option_style: str = "summary"
    question: str = DEFAULT_QUESTION
    label_pool: tuple[str, ...] = ()
    contrast: bool = True
    grounded_targets: bool = True

    def __post_init__(self) -> None:
        check_range("n_options", self.n_options, MIN_OPTIONS, MAX_OPTIONS)
        check_choice("distractors", self.distractors, DISTRACTOR_STYLES)
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

    def weighted(self, items: list[str], weights: list[float], k: int) -> list[str]:
        """``k`` distinct items, each draw proportional to the remaining items' weights."""
        pool = list(zip(items, weights))
        out = []
        for _ in range(min(k, len(pool))):
            total = sum(w for _, w in pool)
            # 53 random bits: a float in [0, 1) that is the same on every platform.
            u = self.below(2**53) / 2**53 * total
            acc = 0.0
            pick = len(pool) - 1
            for i, (_, w) in enumerate(pool):
                acc += w
                if u < acc:
                    pick = i
                    break
            out.append(pool.pop(pick)[0])
        return out

    def sample(self, items: list[str], k: int) -> list[str]:
        """``k`` distinct items in drawn order (a partial Fisher-Yates shuffle)."""
        pool = list(items)
        out = []
        for _ in range(min(k, len(pool))):
            out.append(pool.pop(self.below(len(pool))))
        return out


def known_findings(record: EcgRecord | RecordLabels) -> list[str]:
    """The record's labels that the knowledge base describes, in the record's order."""
    kb = knowledge_base()
    return [label for label in record.labels if label in kb]


def asked_finding(record_id: str, labels: Sequence[str], seed: int) -> str | None:
    """The finding ``make_mcq(record, seed)`` asks about, from the record's id and labels only
    (None when the knowledge base describes none of them). Prepare uses it to balance the
    held-out questions before any signal is read."""
    kb = knowledge_base()
    known = [label for label in labels if label in kb]
    if not known:
        return None
    return known[_Draws(f"{record_id}\x1f{seed}").below(len(known))]


def finding_prevalence(label_sets: Iterable[Sequence[str]]) -> dict[str, float]:
    """How often each finding is the asked one, over a data set's records (shares sum to 1).

    ``make_mcq`` asks about one of a record's known findings, each equally likely, so a record
    adds ``1 / len(known)`` to each of its known findings.
    """
    kb = knowledge_base()
    totals: dict[str, float] = {}
    for labels in label_sets:
        known = [label for label in labels if label in kb]
        for label in known:
            totals[label] = totals.get(label, 0.0) + 1.0 / len(known)
    whole = sum(totals.values())
    return {k: v / whole for k, v in sorted(totals.items())} if whole else {}


def allowed_distractors(labels: Sequence[str], correct: str, pool: list[str]) -> list[str]:
    """Findings from ``pool`` that are certainly wrong answers for a record with ``labels``."""
    kb = knowledge_base()
    held = set(labels)
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


#: Rounds of :func:`calibrate_distractor_weights` at most (the best is kept), and the largest
#: relative miss of a finding's distractor count at which it stops early.
CALIBRATION_ROUNDS = 12
CALIBRATION_TOLERANCE = 0.05


def calibrate_distractor_weights(
    questions: Sequence[tuple[str, Sequence[str], int]],
    config: McqConfig,
    rounds: int = CALIBRATION_ROUNDS,
) -> dict[str, float]:
    """Distractor weights under which each finding is offered about ``n_options`` times as
    often as it is the answer, over ``questions`` (one split of one data set).

    A finding offered ``n`` times as often as it is correct tells a guesser who has not
    looked nothing: every offered option is then right 1/n of the time. Drawing distractors
    in proportion to how often each finding is asked gets close, but not all the way: a
    finding may be a distractor only for some answers (sinus rhythm only against another
    rhythm, not against a premature beat in sinus rhythm), so it is offered less and
    betrays itself. Starting from those shares, each round replays the draws of every
    question (:func:`draw_options`, deterministic) and scales each finding's weight by how
    far its distractor count is from ``(n_options - 1) x`` its answer count.

    Args:
        questions: ``(record_id, labels, seed)`` of every question.
        rounds: At most this many rounds; 0 returns how often each finding is asked.

    Returns:
        Weights per asked finding (summing to 1); findings never asked get none, so they
        fill in only where too few asked findings are allowed. The round whose largest
        relative miss was smallest is returned; a finding asked more often than
        ``1 / n_options`` of the time cannot reach its target (prepare's answer balance
        keeps held-out splits below that).
    """
    asked = Counter(
        f for f in (asked_finding(rid, labels, seed) for rid, labels, seed in questions) if f
    )
    if not asked:
        return {}
    total = sum(asked.values())
    weights = {f: n / total for f, n in sorted(asked.items())}
    target = {f: (config.n_options - 1) * n for f, n in asked.items()}
    best, best_miss = dict(weights), float("inf")
    for _ in range(rounds):  # each round replays every question: stop once close enough
        offered: Counter = Counter()
        for record_id, labels, seed in questions:
            try:
                options, answer, _ = draw_options(record_id, labels, seed, config, weights)
            except McqError:
                continue
            offered.update(o for i, o in enumerate(options) if i != answer)
        miss = max(abs(offered[f] - target[f]) / target[f] for f in target)
        if miss < best_miss:
            best, best_miss = dict(weights), miss
        if best_miss <= CALIBRATION_TOLERANCE:
            break
        # Damped multiplicative steps, bounded so an unreachable target cannot run away.
        weights = {
            f: w * min(max((target[f] / max(offered[f], 0.5)) ** 0.7, 0.2), 5.0)
            for f, w in weights.items()
        }
        norm = sum(weights.values())
        weights = {f: w / norm for f, w in weights.items()}
    return best


def draw_options(
    record_id: str,
    labels: Sequence[str],
    seed: int,
    config: McqConfig,
    weights: Mapping[str, float] | None = None,
) -> tuple[list[str], int, str | None]:
    """The options of ``make_mcq``'s question, from the record's id and labels only.

    Args:
        weights: Distractor weights per finding for the ``prior_balanced`` style (``make_mcq``'s
            ``prevalence``); None or empty draws uniformly from the pool.

    Returns:
        The option findings in order, the answer's index, and the look-alike the
        explanation contrasts with (None without hard distractors).

    Raises:
        McqError: no known finding, or too few allowed distractors.
    """
    kb = knowledge_base()
    known = [label for label in labels if label in kb]
    if not known:
        unknown = [label for label in labels if is_unknown(label)]
        what = f"only unknown codes {unknown}" if unknown else f"labels {list(labels)}"
        raise McqError(f"{record_id}: no finding to ask about ({what})")
    draws = _Draws(f"{record_id}\x1f{seed}")
    correct = known[draws.below(len(known))]  # asked_finding() draws the same
    pool = sorted(config.label_pool or kb)
    allowed = allowed_distractors(labels, correct, pool)
    if len(allowed) < config.n_distractors:
        raise McqError(
            f"{record_id}: only {len(allowed)} findings can be distractors for "
            f"{correct}, need {config.n_distractors} (widen label_pool or lower n_options)"
        )
    balanced = config.distractors == "prior_balanced" and bool(weights)
    weight = {a: float(weights.get(a, 0.0)) for a in allowed} if balanced else {}
    hard_pool = [c for c in kb[correct].confusable if c in allowed and (not balanced or weight[c] > 0)]
    hard = draws.sample(hard_pool, config.n_hard())
    rest = [a for a in allowed if a not in hard]
    if balanced:
        own = [a for a in rest if weight[a] > 0]
        picked = draws.weighted(own, [weight[a] for a in own], config.n_distractors - len(hard))
        # Too few of the data set's own findings: fill in from the rest of the pool.
        filler = [a for a in rest if weight[a] <= 0]
        picked += draws.sample(filler, config.n_distractors - len(hard) - len(picked))
    else:
        picked = draws.sample(rest, config.n_distractors - len(hard))
    distractors = hard + picked
    answer_index = draws.below(config.n_options)
    shuffled = draws.sample(distractors, len(distractors))
    option_labels = shuffled[:answer_index] + [correct] + shuffled[answer_index:]
    return option_labels, answer_index, hard[0] if hard else None


def make_mcq(
    record: EcgRecord,
    seed: int,
    config: McqConfig | None = None,
    prevalence: Mapping[str, float] | None = None,
    measurements: Measurements | None = None,
) -> McqSample:
    """Make one multiple-choice question about ``record``.

    Args:
        record: The ECG with canonical labels.
        seed: Picks the finding asked about (for multi-label records), the distractors and the
            answer's position; the same (record, seed, config, prevalence, measurements)
            always gives the same sample.
        config: How many options, which distractors, how many look-alikes, option wording.
        prevalence: The record's data set's findings and how often each is asked
            (:func:`finding_prevalence`, or prepare's :func:`calibrate_distractor_weights`),
            for ``prior_balanced`` distractors; ignored in the
            ``knowledge_base`` style.
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
    option_labels, answer_index, contrast = draw_options(
        record.record_id, record.labels, seed, config, prevalence
    )
    correct = option_labels[answer_index]
    options = [option_text(kb[label], config.option_style) for label in option_labels]
    letter = LETTERS[answer_index]
    explanation = explain(
        correct, record, config, contrast_with=contrast, measurements=measurements
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

"""An LLM judge of the models' explanations: the study's five-criterion rubric, strict JSON.

The judge sees the question, a ground-truth reference (the clinical description of the true
finding plus the correct option's text) and the model's full answer with its explanation,
and scores five criteria from 1 to 5: ``factual_accuracy``, ``completeness``,
``detail_quality`` and ``context_understanding`` (higher is better) and ``hallucination``
(lower is better). Its reply must be one JSON object with exactly those integer keys and an
optional ``rationale``; a reply that fails validation is answered with the error and asked
again once, and if the second reply fails too the sample is recorded as a judge failure
(``Judgement.failure``), never guessed.

Any OpenAI-compatible server can judge (:class:`OpenAIJudge`: the OpenAI API with gpt-4o by
default, or a local endpoint); tests use a fake behind the :class:`Judge` protocol or a fake
HTTP server. ``RUBRIC_VERSION`` is a short hash of the prompt text, so a report names exactly
which rubric produced its scores; :func:`request_hash` hashes everything a judge request
depends on (the full messages, with the explanation and reference, and the judge's model,
server, temperature and output settings), so a stored score is reused only for the very
same request.

Scores are compared **paired**: per data set, means run over the sample ids that every model
had judged successfully, and differences between two models are means of per-sample
differences with a bootstrap interval that resamples patients (or recordings).

Nothing here opens a connection on import.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ecgvlm.config import check_range
from ecgvlm.evaluate.metrics import cluster_bootstrap_mean
from ecgvlm.records import Judgement

#: The study's criteria, in table order.
CRITERIA: tuple[str, ...] = (
    "factual_accuracy",
    "completeness",
    "detail_quality",
    "context_understanding",
    "hallucination",
)
#: Criteria where a lower score is better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"hallucination"})
SCORE_MIN, SCORE_MAX = 1, 5

RUBRIC_SYSTEM = """\
You are a board-certified cardiologist grading an AI model's reading of a 12-lead ECG \
printout. You are given the multiple-choice question the model answered, a reference \
description of the correct finding (the ground truth), and the model's answer with its \
explanation. Judge the explanation against the reference only; do not reward length.

Score each criterion with an integer from 1 to 5:
- factual_accuracy: are the stated findings and the chosen answer consistent with the \
reference? 1 = contradicts it, 5 = fully consistent.
- completeness: does the explanation cover the features that define the reference finding? \
1 = none of them, 5 = all of them.
- detail_quality: are the ECG features described specifically (leads, intervals, wave \
morphology, rate, rhythm)? 1 = vague or generic, 5 = specific and precise.
- context_understanding: does the explanation address the question asked and relate the \
findings to it? 1 = ignores the question, 5 = answers it directly and coherently.
- hallucination: does the explanation assert findings the reference does not support? \
1 = none (best), 5 = mostly invented (worst). LOWER IS BETTER for this criterion only.

Reply with only one JSON object, no other text, with exactly these keys: \
"factual_accuracy", "completeness", "detail_quality", "context_understanding", \
"hallucination" (integers 1 to 5) and "rationale" (one or two sentences)."""

RUBRIC_USER = """\
Question:
{question}

Reference (ground truth):
{reference}

Model's answer and explanation:
{explanation}"""

RUBRIC_RETRY = """\
Your reply could not be used: {error}. Reply again with only the JSON object, with exactly \
the keys factual_accuracy, completeness, detail_quality, context_understanding, \
hallucination (integers 1 to 5) and rationale (a string)."""

#: Short hash of the prompt text: changes whenever the rubric wording does.
RUBRIC_VERSION = hashlib.sha256(
    "\n\x00\n".join((RUBRIC_SYSTEM, RUBRIC_USER, RUBRIC_RETRY)).encode()
).hexdigest()[:12]

_ALLOWED_KEYS = frozenset(CRITERIA) | {"rationale"}


class JudgeOutputError(ValueError):
    """A judge reply that is not the required JSON object; the message says what is wrong."""


class JudgeUnavailableError(RuntimeError):
    """The judge cannot be called (e.g. no API key for the OpenAI API)."""


@dataclass(frozen=True)
class JudgeConfig:
    """How to judge explanations.

    Attributes:
        enabled: Run the judge at all.
        model: Judge model name as the server knows it.
        base_url: OpenAI-compatible ``/v1`` base URL; None means the OpenAI API.
        api_key_env: Environment variable holding the API key. A local ``base_url`` without
            the variable set gets a placeholder key (local servers ignore it).
        temperature: Sampling temperature (0: as deterministic as the server allows).
        json_mode: Send ``response_format={"type": "json_object"}`` (servers that reject it
            should set this to false).
        n_samples: Samples judged per model x data set (the same sample ids for every model,
            so the comparison is paired); fewer when a group is smaller.
        seed: Seed of the sample draw and of the score CIs.
        concurrency: Judge requests in flight at once.
        timeout_s: Per-request time-out.
        max_retries: Retries (with the client's exponential backoff) on connection errors,
            429 and 5xx, before a sample is recorded as a judge failure.
        max_tokens: Cap on the judge's reply length.
    """

    enabled: bool = True
    model: str = "gpt-4o"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    json_mode: bool = True
    n_samples: int = 150
    seed: int = 0
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 2
    max_tokens: int = 400

    def __post_init__(self) -> None:
        check_range("judge.temperature", self.temperature, 0.0, 2.0)
        check_range("judge.n_samples", self.n_samples, 1)
        check_range("judge.concurrency", self.concurrency, 1, 1024)
        check_range("judge.timeout_s", self.timeout_s, 0.001)
        check_range("judge.max_retries", self.max_retries, 0, 20)
        check_range("judge.max_tokens", self.max_tokens, 16)


@dataclass(frozen=True)
class JudgeItem:
    """One explanation to judge."""

    sample_id: str
    dataset: str
    model: str
    question: str
    reference: str
    explanation: str


class Judge(Protocol):
    """Anything that answers chat messages with text; ``model`` names it in the report."""

    model: str

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Return the judge's reply to ``messages`` (raise on transport errors)."""
        ...


class OpenAIJudge:
    """A judge on any OpenAI-compatible server, through the ``openai`` client.

    Args:
        config: Model, base URL, key variable, temperature, time-out and retries.

    Raises:
        JudgeUnavailableError: when the OpenAI API is meant (no ``base_url``) but the key
            variable is not set.
    """

    def __init__(self, config: JudgeConfig) -> None:
        import openai

        key = os.environ.get(config.api_key_env)
        if not key:
            if config.base_url is None:
                raise JudgeUnavailableError(
                    f"judge model {config.model!r} needs the OpenAI API but "
                    f"{config.api_key_env} is not set"
                )
            key = "EMPTY"  # local OpenAI-compatible servers ignore the key
        self.config = config
        self.model = config.model
        self._client = openai.OpenAI(
            base_url=config.base_url,
            api_key=key,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    def complete(self, messages: list[dict[str, str]]) -> str:
        kwargs: dict[str, Any] = {}
        if self.config.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        response = self._client.chat.completions.create(
            model=self.config.model,
            messages=messages,
            temperature=self.config.temperature,
            max_tokens=self.config.max_tokens,
            **kwargs,
        )
        return response.choices[0].message.content or ""


def reference_text(correct_option: str, description: str | None = None) -> str:
    """The ground truth shown to the judge: the correct option, then its clinical description."""
    parts = [f"Correct answer: {correct_option.strip()}"]
    if description and description.strip() and description.strip() != correct_option.strip():
        parts.append(f"Clinical description: {description.strip()}")
    return "\n".join(parts)


def judge_messages(item: JudgeItem) -> list[dict[str, str]]:
    """The rubric as chat messages for one explanation."""
    user = RUBRIC_USER.format(
        question=item.question.strip() or "(not given)",
        reference=item.reference.strip(),
        explanation=item.explanation.strip() or "(empty)",
    )
    return [{"role": "system", "content": RUBRIC_SYSTEM}, {"role": "user", "content": user}]


def request_hash(item: JudgeItem, config: JudgeConfig) -> str:
    """Short hash of one judge request: the full messages and every setting that shapes the
    reply (model, base URL, temperature, JSON mode, token cap). Equal hashes, same request."""
    blob = json.dumps(
        {
            "messages": judge_messages(item),
            "model": config.model,
            "base_url": config.base_url,
            "temperature": config.temperature,
            "json_mode": config.json_mode,
            "max_tokens": config.max_tokens,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_judge_reply(text: str) -> tuple[dict[str, int], str]:
    """Validate a judge reply strictly.

    Returns:
        (criterion -> score, rationale).

    Raises:
        JudgeOutputError: unless ``text`` is one JSON object whose keys are exactly the five
            criteria (integers 1-5) plus an optional string ``rationale``.
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise JudgeOutputError(f"not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise JudgeOutputError(f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in CRITERIA if k not in data]
    if missing:
        raise JudgeOutputError(f"missing key(s) {', '.join(missing)}")
    extra = sorted(set(data) - _ALLOWED_KEYS)
    if extra:
        raise JudgeOutputError(f"unexpected key(s) {', '.join(extra)}")
    scores = {}
    for key in CRITERIA:
        value = data[key]
        # bool is an int subclass and 3.0 is not an integer score: both are rejected.
        if type(value) is not int or not SCORE_MIN <= value <= SCORE_MAX:
            raise JudgeOutputError(
                f"{key} must be an integer {SCORE_MIN}-{SCORE_MAX}, got {value!r}"
            )
        scores[key] = value
    rationale = data.get("rationale", "")
    if not isinstance(rationale, str):
        raise JudgeOutputError(f"rationale must be a string, got {rationale!r}")
    return scores, rationale


def judge_explanation(judge: Judge, item: JudgeItem) -> Judgement:
    """Score one explanation: ask, validate, ask again once if malformed, else record failure.

    Transport errors (after the client's own retries) are recorded as failures too, with
    the error named, so one unreachable request does not lose a whole run's judgements.
    """
    messages = judge_messages(item)
    failure: str | None = None
    scores: dict[str, int | None] = {k: None for k in CRITERIA}
    rationale = ""
    attempts = 0
    start = time.perf_counter()
    for attempt in range(2):
        attempts = attempt + 1
        try:
            reply = judge.complete(messages)
        except Exception as e:  # noqa: BLE001 - recorded in Judgement.failure, not swallowed
            failure = f"request failed: {type(e).__name__}: {e}"
            break
        try:
            parsed, rationale = parse_judge_reply(reply)
        except JudgeOutputError as e:
            failure = f"malformed reply after {attempts} attempt(s): {e}"
            messages = messages + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": RUBRIC_RETRY.format(error=e)},
            ]
            continue
        scores.update(parsed)
        failure = None
        break
    return Judgement(
        sample_id=item.sample_id,
        dataset=item.dataset,
        model=item.model,
        judge_model=judge.model,
        rubric_version=RUBRIC_VERSION,
        rationale=rationale,
        failure=failure,
        attempts=attempts,
        latency_s=time.perf_counter() - start,
        **scores,
    )


def judge_all(
    judge: Judge,
    items: Sequence[JudgeItem],
    concurrency: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[Judgement]:
    """Judge many explanations with ``concurrency`` requests in flight; order is kept."""
    if not items:
        return []
    out: list[Judgement] = []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(items)))) as pool:
        for judgement in pool.map(lambda it: judge_explanation(judge, it), items):
            out.append(judgement)
            if progress is not None:
                progress(1)
    return out


def _answered(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, set[str]]]:
    """Data set -> model -> ids answered without a request error."""
    answered: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        dataset, model = str(row["dataset"]), str(row["model"])
        per_model = answered.setdefault(dataset, {})
        ids = per_model.setdefault(model, set())
        error = row.get("error")
        # A null read back through pandas may be NaN rather than None.
        if error is None or (isinstance(error, float) and np.isnan(error)) or error == "":
            ids.add(str(row["sample_id"]))
    return answered


def unanswered_groups(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(model, data set) pairs where every request failed: nothing of theirs can be judged,
    and they are left out of the other models' common sample (see ``sample_for_judging``)."""
    return sorted(
        (model, dataset)
        for dataset, per_model in _answered(rows).items()
        for model, ids in per_model.items()
        if not ids
    )


def sample_for_judging(
    rows: Iterable[Mapping[str, Any]], n_samples: int, seed: int
) -> dict[tuple[str, str], list[str]]:
    """Pick up to ``n_samples`` sample ids per (model, data set), the same ids for every model.

    Per data set, the ids that every model answered (no request error) are shuffled with
    ``np.random.default_rng(seed)`` over their sorted order and the first ``n_samples`` taken,
    so the draw is reproducible and the models are compared on the same ECGs. A model whose
    every request on a data set failed is left out of that data set (and of the intersection,
    which would otherwise be empty for all models); :func:`unanswered_groups` names it.

    Returns:
        {(model, dataset): [sample_id, ...]}.
    """
    out: dict[tuple[str, str], list[str]] = {}
    for dataset, per_model in sorted(_answered(rows).items()):
        answering = {m: ids for m, ids in per_model.items() if ids}
        common = sorted(set.intersection(*answering.values())) if answering else []
        order = np.random.default_rng(seed).permutation(len(common))
        chosen = [common[i] for i in order[:n_samples]]
        for model in sorted(answering):
            out[(model, dataset)] = chosen
    return out


def _paired_ids(items: dict[str, list[Judgement]]) -> tuple[set[str], dict[str, str]]:
    """Ids judged successfully for every model with any success, and the models left out."""
    ok = {m: {j.sample_id for j in js if j.failure is None} for m, js in items.items()}
    excluded = {m: "every judgement failed" for m, ids in ok.items() if not ids}
    kept = [ids for m, ids in ok.items() if m not in excluded]
    return (set.intersection(*kept) if kept else set()), excluded


def summarize_judgements(
    judgements: Iterable[Judgement],
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Table 2 numbers: per model and data set, each criterion's paired mean, sd and CI.

    Means run over the sample ids that every model of the data set had judged successfully
    (``n_paired``), so models are compared on the same ECGs; a model with no successful
    judgement on a data set is left out of that pairing (``excluded`` says why). Failures are
    counted (``n_failures``). Intervals resample the ids' clusters (patients or recordings).

    Args:
        clusters: sample id -> its patient (or recording); ids without one are their own.

    Returns:
        ``{model: {dataset: {"n": int, "n_failures": int, "n_paired": int, "excluded"?: str,
        criterion: {"mean", "sd", "ci": [lo, hi]}}}}`` (a criterion's entry is None when no
        paired judgement exists).
    """
    clusters = clusters or {}
    by_dataset: dict[str, dict[str, list[Judgement]]] = {}
    for j in judgements:
        by_dataset.setdefault(j.dataset, {}).setdefault(j.model, []).append(j)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset, per_model in sorted(by_dataset.items()):
        paired, excluded = _paired_ids(per_model)
        for model, items in sorted(per_model.items()):
            ok = sorted((j for j in items if j.failure is None and j.sample_id in paired),
                        key=lambda j: j.sample_id)
            entry: dict[str, Any] = {
                "n": len(items),
                "n_failures": sum(j.failure is not None for j in items),
                "n_paired": len(ok),
            }
            if model in excluded:
                entry["excluded"] = excluded[model]
            groups = [clusters.get(j.sample_id) for j in ok]
            for criterion in CRITERIA:
                values = np.array([getattr(j, criterion) for j in ok], dtype=np.float64)
                if len(values) == 0:
                    entry[criterion] = None
                    continue
                lo, hi = cluster_bootstrap_mean(values, groups, n_boot=n_boot, seed=seed)
                entry[criterion] = {
                    "mean": float(values.mean()),
                    "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                    "ci": [lo, hi],
                }
            out.setdefault(model, {})[dataset] = entry
    return out


def paired_differences(
    judgements: Iterable[Judgement],
    n_boot: int = 1000,
    seed: int = 0,
    clusters: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per data set and pair of models ("a - b", names sorted): the mean per-sample difference
    of each criterion over the ids both had judged successfully, with a paired bootstrap CI
    that resamples the ids' clusters (patients or recordings).

    Returns:
        ``{dataset: {"a - b": {"n": int, criterion: {"mean", "ci": [lo, hi]}}}}``.
    """
    clusters = clusters or {}
    scores: dict[str, dict[str, dict[str, Judgement]]] = {}
    for j in judgements:
        if j.failure is None:
            scores.setdefault(j.dataset, {}).setdefault(j.model, {})[j.sample_id] = j
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset, per_model in sorted(scores.items()):
        models = sorted(per_model)
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                ids = sorted(set(per_model[a]) & set(per_model[b]))
                if not ids:
                    continue
                groups = [clusters.get(s) for s in ids]
                entry: dict[str, Any] = {"n": len(ids)}
                for criterion in CRITERIA:
                    diff = np.array([getattr(per_model[a][s], criterion)
                                     - getattr(per_model[b][s], criterion) for s in ids],
                                    dtype=np.float64)
                    lo, hi = cluster_bootstrap_mean(diff, groups, n_boot=n_boot, seed=seed)
                    entry[criterion] = {"mean": float(diff.mean()), "ci": [lo, hi]}
                out.setdefault(dataset, {})[f"{a} - {b}"] = entry
    return out

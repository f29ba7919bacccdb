"""Generation with PULSE, shared by serving and training-time evaluation.

:func:`generate` turns prompts (each holding one ``<image>``; the llava_v1 text itself comes
from :mod:`ecgvlm.prompt`) and PIL images into :class:`Generation` records. It is batch-safe:
prompts are left-padded, so every row's answer starts right after its own prompt, and a batch
gives the same greedy answers as one prompt at a time. It refuses a prompt longer than the
model's context instead of cutting it.

:func:`generate_batched` is what a server needs on a GPU: it splits a batch so that each part
fits a token budget (the KV cache grows with rows x (longest prompt + new tokens)), and
answers a CUDA out-of-memory error by freeing the cache and retrying halves, so one
oversized batch costs the requests that cannot fit alone, not the whole batch.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ecgvlm.prompt import ANSWER_PREFIX

# The most new tokens one call may ask for (an MCQ answer plus explanation needs a few hundred).
MAX_NEW_TOKENS_LIMIT = 4096


#: Most alternatives a generated token's log-probability comes with (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the distribution it was drawn from.

    Attributes:
        token_id: the token generated.
        logprob: its log-probability: ``log_softmax(logits)`` when greedy, ``log_softmax(
            logits / temperature)`` (after the nucleus cut, with ``top_p`` < 1) when sampling.
        top: the most probable tokens of that distribution as (token id, log-probability),
            most probable first (as many as asked for).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    """One answer.

    Attributes:
        text: decoded answer, up to (not including) the first end-of-sequence token.
        prompt_tokens: tokens of the prompt, text plus image features, as the LM saw them.
        completion_tokens: tokens generated, the end-of-sequence token included if produced.
        logprobs: with ``logprobs`` asked for, one entry per generated token before the
            end-of-sequence token; else None.
        cancelled: generation of this row was stopped because ``is_cancelled`` said so.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    cancelled: bool = False


#: ``on_token(row, step, token_id, logprob)``: called from the generating thread for each
#: token a row generates (its end-of-sequence token included), ``logprob`` None unless asked.
TokenCallback = Callable[[int, int, int, "TokenLogprob | None"], None]


class PromptTooLongError(ValueError):
    """A prompt past the model's context, or one that leaves no room for the new tokens.

    Attributes:
        row: index of the prompt at fault.
        detail: what is wrong, without the row ("takes 4,200 tokens ...").
        new_tokens_at_fault: True when the prompt fits but not with the new tokens asked for.
    """

    def __init__(self, row: int, detail: str, new_tokens_at_fault: bool) -> None:
        super().__init__(f"prompt {row} {detail}")
        self.row = row
        self.detail = detail
        self.new_tokens_at_fault = new_tokens_at_fault


@dataclass(frozen=True)
class OutOfMemory:
    """A prompt that ran out of device memory even in a batch of its own (cache freed)."""

    message: str


def _unwrap(model: Any) -> Any:
    """The PulseModel inside a PEFT or DeepSpeed wrapper (adapters stay active in place)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


class _GenerationTap:
    """What ``generate`` watches step by step: each row's tokens, their log-probabilities,
    and whether its client still wants it.

    Two hooks into transformers' decoding loop share it: :meth:`processor` (a logits
    processor, run on each step's logits before any sampling warper) keeps the step's
    log-probabilities, and :meth:`criterion` (a stopping criterion, run once the step's
    tokens are chosen) records the tokens, calls ``on_token`` and stops cancelled rows.
    """

    def __init__(
        self, rows: int, eos_token_id: int, temperature: float, top_p: float,
        top_logprobs: int | None, on_token: TokenCallback | None,
        is_cancelled: Callable[[int], bool] | None,
    ) -> None:
        self.eos = eos_token_id
        self.temperature = temperature
        self.top_p = top_p
        self.top_logprobs = top_logprobs
        self.on_token = on_token
        self.is_cancelled = is_cancelled
        self.step = 0
        self.counts = [0] * rows
        self.finished = [False] * rows
        self.cancelled = [False] * rows
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self._logp: torch.Tensor | None = None

    def processor(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.top_logprobs is not None:
            # The distribution the token is drawn from: the sampler divides by the
            # temperature and cuts the nucleus after this processor has run.
            dist = scores.float()
            if self.temperature > 0:
                dist = dist / self.temperature
                if self.top_p < 1:
                    from transformers import TopPLogitsWarper

                    dist = TopPLogitsWarper(self.top_p)(input_ids, dist)
            self._logp = torch.log_softmax(dist, dim=-1)
        return scores

    def criterion(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        tokens = input_ids[:, -1].tolist()
        chosen: list[float] = []
        top: list[list[tuple[int, float]]] = [[] for _ in tokens]
        if self._logp is not None:
            ids = input_ids[:, -1:].to(self._logp.device)
            chosen = self._logp.gather(1, ids)[:, 0].tolist()
            if self.top_logprobs:
                values, indices = self._logp.topk(self.top_logprobs, dim=-1)
                top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        for row, token in enumerate(tokens):
            if self.finished[row]:
                continue
            self.counts[row] += 1
            entry = (TokenLogprob(token, chosen[row], tuple(top[row]))
                     if self._logp is not None else None)
            if entry is not None and token != self.eos:
                self.logprobs[row].append(entry)
            if self.on_token is not None:
                self.on_token(row, self.step, token, entry)
            if token == self.eos:
                self.finished[row] = True
            elif self.is_cancelled is not None and self.is_cancelled(row):
                self.finished[row] = self.cancelled[row] = True
        self.step += 1
        return torch.tensor(self.cancelled, dtype=torch.bool, device=input_ids.device)

    def hooks(self) -> dict[str, Any]:
        """``generate`` keyword arguments that install the tap."""
        from transformers import (
            LogitsProcessor,
            LogitsProcessorList,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        tap = self

        class _Criterion(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> Any:
                return tap.criterion(input_ids, scores, **kwargs)

        class _Processor(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                return tap.processor(input_ids, scores)

        return {"logits_processor": LogitsProcessorList([_Processor()]),
                "stopping_criteria": StoppingCriteriaList([_Criterion()])}


def generate(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    top_logprobs: int | None = None,
    on_token: TokenCallback | None = None,
    is_cancelled: Callable[[int], bool] | None = None,
) -> list[Generation]:
    """Answer each prompt about its image.

    Sampling draws from ``softmax(logits / temperature)``, cut to the nucleus ``top_p``, and
    nothing else (OpenAI's sampling: no top-k).

    Args:
        model: a PulseModel (or a PEFT model wrapping one).
        processor: its PulseProcessor.
        prompts: full prompt strings, one ``<image>`` each.
        images: one PIL image per prompt; None asks every prompt without an image (prompts
            without ``<image>``: what the language model answers alone).
        max_new_tokens: at most this many new tokens per answer.
        temperature: 0 for greedy decoding, else sampling temperature.
        top_p: nucleus sampling mass when sampling.
        seed: seeds torch's generator for sampling (reproducible answers).
        top_logprobs: None for no log-probabilities; else each generated token's
            :class:`TokenLogprob` with this many alternatives (0 to ``MAX_TOP_LOGPROBS``).
        on_token: called for each generated token as it is chosen (streaming).
        is_cancelled: ``is_cancelled(row)`` is asked after each of a row's tokens; True stops
            that row (the others go on; the call returns when every row has stopped).

    Returns:
        One Generation per prompt, in order.

    Raises:
        ValueError: bad arguments, prompts or images (PromptError, ImageInputError).
    """
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(
            f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
    base = _unwrap(model)
    batch = processor(list(prompts), None if images is None else list(images))
    device = base.device
    batch = {k: v.to(device) for k, v in batch.items()}
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if temperature > 0:
        # top_k=0: transformers would otherwise cut to its default top-50 unasked.
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    tap = None
    if top_logprobs is not None or on_token is not None or is_cancelled is not None:
        tap = _GenerationTap(len(prompts), tokenizer.eos_token_id, temperature, top_p,
                             top_logprobs, on_token, is_cancelled)
        kwargs.update(tap.hooks())
    if seed is not None:
        torch.manual_seed(seed)
    if "image_sizes" in batch:
        prompt_lengths = [
            int(m.sum()) - 1 + base.num_image_features((int(w), int(h)))
            for m, (w, h) in zip(batch["attention_mask"], batch["image_sizes"])
        ]
    else:
        prompt_lengths = [int(m.sum()) for m in batch["attention_mask"]]
    check_context(base, prompt_lengths, max_new_tokens)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            new_ids = base.generate(**batch, **kwargs)
    finally:
        base.train(was_training)
    out = []
    eos = tokenizer.eos_token_id
    for row, ids in enumerate(new_ids.tolist()):
        # Rows that finished early are padded after their EOS (or their cancellation).
        if tap is not None:
            n = tap.counts[row]
        else:
            n = ids.index(eos) + 1 if eos in ids else len(ids)
        out.append(
            Generation(
                text=processor.decode(ids[:n]),
                prompt_tokens=prompt_lengths[row],
                completion_tokens=n,
                logprobs=(tuple(tap.logprobs[row])
                          if tap is not None and top_logprobs is not None else None),
                cancelled=tap is not None and tap.cancelled[row],
            )
        )
    return out


# -- context and memory -------------------------------------------------------------------


def prompt_tokens(model: Any, processor: Any, prompts: Sequence[str],
                  images: Sequence[Image.Image] | None) -> list[int]:
    """Positions each prompt takes in the LM: its text tokens plus its image's features
    (``images`` None: prompts asked without an image, text tokens only).

    Raises:
        PromptError: a prompt without exactly one ``<image>`` (with images: any, without).
    """
    if images is None:
        return [len(row) for row in processor.encode_prompts(prompts, with_image=False)]
    base = _unwrap(model)
    ids = processor.encode_prompts(prompts)
    return [len(row) - 1 + base.num_image_features(image.size) for row, image in zip(ids, images)]


def _pick(images: Sequence[Image.Image] | None, idxs: Sequence[int]) -> list[Image.Image] | None:
    return None if images is None else [images[i] for i in idxs]


def check_context(model: Any, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """Refuse a prompt the model would see cut, or whose answer runs past its positions.

    LLaVA's code cuts merged sequences at ``tokenizer_model_max_length`` from the end, which
    for a prompt would drop ``ASSISTANT:`` and leave the model continuing the question.

    Raises:
        PromptTooLongError: naming the first prompt at fault and the limit.
    """
    base = _unwrap(model)
    max_len = base.pulse_config.tokenizer_model_max_length
    max_positions = getattr(base.config, "max_position_embeddings", None)
    for row, n in enumerate(prompt_lengths):
        if max_len is not None and n > max_len:
            raise PromptTooLongError(
                row,
                f"takes {n} tokens (text plus image features); the model reads at most "
                f"{max_len} (tokenizer_model_max_length): shorten the text or send a smaller "
                "image",
                new_tokens_at_fault=False,
            )
        if max_positions is not None and n + max_new_tokens > max_positions:
            raise PromptTooLongError(
                row,
                f"takes {n} tokens and {max_new_tokens} new tokens were asked for: "
                f"{n + max_new_tokens} positions exceed the model's max_position_embeddings "
                f"{max_positions}; ask for at most {max(max_positions - n, 0)} new tokens",
                new_tokens_at_fault=True,
            )


@dataclass(frozen=True)
class MemoryCosts:
    """Device memory per token position of a batch, from the model's shapes and dtype.

    Attributes:
        kv_bytes_per_token: the KV cache: keys and values of every layer (PULSE-7B in bf16:
            2 x 32 layers x 32 heads x 128 x 2 bytes = 0.5 MiB).
        prefill_bytes_per_token: the largest activations alive at once during the prompt's
            forward (residual, normed input, q/k/v, attention output, MLP gate, up and
            activation), a bound, not a measurement.
    """

    kv_bytes_per_token: int
    prefill_bytes_per_token: int

    @property
    def bytes_per_token(self) -> int:
        return self.kv_bytes_per_token + self.prefill_bytes_per_token


def memory_costs(model: Any) -> MemoryCosts:
    """The :class:`MemoryCosts` of ``model``'s language model at its parameter dtype."""
    base = _unwrap(model)
    cfg = base.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = base.dtype.itemsize
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize
    prefill = (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * itemsize
    return MemoryCosts(kv, prefill)


def batch_tokens(prompt_lengths: Sequence[int], max_new_tokens: int) -> int:
    """Positions a batch holds at its last step: left padding makes every row the longest's."""
    return len(prompt_lengths) * (max(prompt_lengths) + max_new_tokens)


def max_batch_tokens_for(free_bytes: int, costs: MemoryCosts,
                         headroom_fraction: float = 0.1) -> int:
    """The batch token budget that fits ``free_bytes`` (what is free after the weights),
    keeping ``headroom_fraction`` for the allocator's fragmentation and the CLIP tower."""
    if not 0 <= headroom_fraction < 1:
        raise ValueError(f"headroom_fraction must be in [0, 1), got {headroom_fraction}")
    return max(int(free_bytes * (1 - headroom_fraction)) // costs.bytes_per_token, 1)


def plan_batches(prompt_lengths: Sequence[int], max_new_tokens: int,
                 max_batch_tokens: int | None) -> list[list[int]]:
    """Split prompts, in arrival order, into batches of at most ``max_batch_tokens``.

    A prompt over the budget on its own still gets a batch of its own (the budget is a bound;
    if it does run out of memory, :func:`generate_batched` says so for that prompt alone).
    """
    if max_batch_tokens is None:
        return [list(range(len(prompt_lengths)))] if prompt_lengths else []
    plans: list[list[int]] = []
    for i, n in enumerate(prompt_lengths):
        current = plans[-1] if plans else None
        lengths = [prompt_lengths[j] for j in current or []] + [n]
        if current and batch_tokens(lengths, max_new_tokens) <= max_batch_tokens:
            current.append(i)
        else:
            plans.append([i])
    return plans


def free_device_memory() -> None:
    """Return cached blocks to the device after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_within_budget(
    run: Callable[[list[int]], list[Any]],
    prompt_lengths: Sequence[int],
    extra_tokens: int,
    max_batch_tokens: int | None,
    what: str,
) -> list[Any]:
    """``run(indices)`` over batches that fit ``max_batch_tokens``, surviving out-of-memory.

    A batch that runs out of device memory is retried as two halves after the cache is
    freed; a prompt that fails alone is answered with :class:`OutOfMemory` (``what`` says
    what it was doing), and every other prompt still gets its result.
    """
    results: list[Any] = [None] * len(prompt_lengths)
    pending = plan_batches(prompt_lengths, extra_tokens, max_batch_tokens)
    while pending:
        idxs = pending.pop(0)
        try:
            out = run(idxs)
        except torch.cuda.OutOfMemoryError:
            out = None  # freed below, once the exception no longer holds the batch's frames
        if out is not None:
            for i, r in zip(idxs, out):
                results[i] = r
            continue
        free_device_memory()
        if len(idxs) > 1:
            half = len(idxs) // 2
            pending[:0] = [idxs[:half], idxs[half:]]
        else:
            results[idxs[0]] = OutOfMemory(
                f"out of device memory {what} after a {prompt_lengths[idxs[0]]}-token prompt "
                "on its own"
            )
    assert all(r is not None for r in results)
    return results


def generate_batched(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    max_new_tokens: int = 128,
    max_batch_tokens: int | None = None,
    prompt_lengths: Sequence[int] | None = None,
    **kwargs: Any,
) -> list[Generation | OutOfMemory]:
    """:func:`generate` in batches that fit ``max_batch_tokens``, surviving out-of-memory
    (:func:`run_within_budget`). ``prompt_lengths``: :func:`prompt_tokens`, when the caller
    has counted them. ``on_token`` and ``is_cancelled`` are :func:`generate`'s, with rows
    numbered as ``prompts`` (a row retried after running out of memory starts again at step
    0); other ``kwargs`` go to :func:`generate`.

    Raises:
        PromptTooLongError, PromptError, ImageInputError: as :func:`generate`.
    """
    lengths = prompt_lengths or prompt_tokens(model, processor, prompts, images)
    check_context(model, lengths, max_new_tokens)
    on_token = kwargs.pop("on_token", None)
    is_cancelled = kwargs.pop("is_cancelled", None)

    def run(idxs: list[int]) -> list[Generation]:
        hooks: dict[str, Any] = {}
        if on_token is not None:
            hooks["on_token"] = lambda row, *rest: on_token(idxs[row], *rest)
        if is_cancelled is not None:
            hooks["is_cancelled"] = lambda row: is_cancelled(idxs[row])
        return generate(model, processor, [prompts[i] for i in idxs], _pick(images, idxs),
                        max_new_tokens=max_new_tokens, **hooks, **kwargs)

    return run_within_budget(run, lengths, max_new_tokens, max_batch_tokens,
                             f"generating {max_new_tokens} tokens")


# -- constrained choice -------------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceScores:
    """One prompt's constrained answer.

    Attributes:
        logprobs: choice -> log-probability, normalised over the choices (they sum to 1 as
            probabilities), in the order given.
        sequence_logprobs: choice -> the model's own log-probability of the choice's tokens
            after the prompt and answer prefix (not normalised).
        prompt_tokens: positions of the prompt (text plus image features) and answer prefix.
    """

    logprobs: dict[str, float]
    sequence_logprobs: dict[str, float]
    prompt_tokens: int

    @property
    def best(self) -> str:
        return max(self.logprobs, key=self.logprobs.__getitem__)


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def score_choices(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    choices: Sequence[Sequence[str]],
    prefix: str = ANSWER_PREFIX,
) -> list[ChoiceScores]:
    """Score each prompt's ``choices`` as continuations of ``prompt + prefix``, in one forward
    pass for the batch.

    When every choice of a prompt is one token after the shared text (letters "A", "B", ...),
    that prompt is one row and its choices are read from the next-token distribution: the
    cost of a one-token generation. Otherwise each choice is a row of its own and its tokens'
    log-probabilities are summed (teacher forcing). Rows are left-padded, so every row ends
    at the last position and only the last positions' logits are computed. ``images`` None
    scores prompts asked without an image (no ``<image>`` in them).

    Raises:
        ValueError: a prompt without choices or with duplicate choices;
        PromptTooLongError, PromptError, ImageInputError: as :func:`generate`.
    """
    base = _unwrap(model)
    if len(choices) != len(prompts):
        raise ValueError(f"need one choice list per prompt, got {len(choices)} for {len(prompts)}")
    if processor.padding_side != "left":
        raise ValueError("score_choices needs a left-padding processor")
    with_image = images is not None
    rows_ids: list[list[int]] = []
    rows_image: list[Image.Image | None] = []
    # Per prompt: (first row, [(choice, token ids scored, row offset)]).
    plans: list[tuple[int, list[tuple[str, list[int], int]]]] = []
    shared_lengths = []
    for i, (prompt, image, options) in enumerate(zip(prompts, images or [None] * len(prompts),
                                                     choices)):
        if not options or len(set(options)) != len(options):
            raise ValueError(f"prompt {i}: choices must be distinct and at least one")
        full = processor.encode_prompts([prompt + prefix + c for c in options], with_image)
        shared = _common_prefix(full) if len(full) > 1 else len(full[0]) - 1
        if shared == 0 or any(len(f) == shared for f in full):
            raise ValueError(f"prompt {i}: a choice adds no token after the prompt ({options})")
        shared_lengths.append(shared)
        first = len(rows_ids)
        if all(len(f) == shared + 1 for f in full):
            rows_ids.append(full[0][:shared])
            rows_image.append(image)
            plans.append((first, [(c, [f[shared]], 0) for c, f in zip(options, full)]))
        else:
            for f in full:
                rows_ids.append(f[:-1])
                rows_image.append(image)
            plans.append((first, [(c, f[shared:], k) for k, (c, f) in enumerate(zip(options, full))]))
    # A prompt's length in the LM: its text, with its image token replaced by the features.
    n_image = [base.num_image_features(img.size) - 1 for img in images] if with_image else [0] * len(prompts)
    check_context(base, [s + n for s, n in zip(shared_lengths, n_image)], 1)
    pad = processor.tokenizer.pad_token_id
    device = base.device
    batch = {
        "input_ids": processor.pad(rows_ids, pad),
        "attention_mask": processor.pad([[1] * len(r) for r in rows_ids], 0),
    }
    if with_image:
        batch["pixel_values"], batch["image_sizes"] = processor.encode_images(rows_image)
    else:
        # The image merge numbers positions without the padding; text rows need the same.
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    keep = max(len(ids) for _, scored in plans for _, ids, _ in scored)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            logits = base(**batch, logits_to_keep=keep).logits.float()
    finally:
        base.train(was_training)
    logp = torch.log_softmax(logits, dim=-1)  # (rows, keep, vocab); row ends at position -1
    out = []
    for (first, scored), shared, n in zip(plans, shared_lengths, n_image):
        seq = {}
        for choice, ids, offset in scored:
            # A row ends one token before its choice's last token: the kept position
            # keep - m + j predicts the choice's token j (one-token choices: the last one).
            positions = range(keep - len(ids), keep)
            seq[choice] = float(sum(logp[first + offset, p, t] for p, t in zip(positions, ids)))
        total = torch.logsumexp(torch.tensor(list(seq.values()), dtype=torch.float64), 0).item()
        out.append(ChoiceScores({c: v - total for c, v in seq.items()}, seq, shared + n))
    return out


def score_choices_batched(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image] | None,
    choices: Sequence[Sequence[str]],
    max_batch_tokens: int | None = None,
    prefix: str = ANSWER_PREFIX,
    prompt_lengths: Sequence[int] | None = None,
) -> list[ChoiceScores | OutOfMemory]:
    """:func:`score_choices` in batches that fit ``max_batch_tokens``, surviving
    out-of-memory (:func:`run_within_budget`); ``prompt_lengths`` as in
    :func:`generate_batched`."""
    lengths = prompt_lengths or prompt_tokens(model, processor, prompts, images)

    def run(idxs: list[int]) -> list[ChoiceScores]:
        return score_choices(model, processor, [prompts[i] for i in idxs],
                             _pick(images, idxs), [choices[i] for i in idxs], prefix)

    return run_within_budget(run, lengths, 1, max_batch_tokens, "scoring choices")

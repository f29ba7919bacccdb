"""PULSE on a replica: one base model, LoRA adapters sharing its weights, grouped batches."""

from __future__ import annotations

import io
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ecgvlm.serving.chat import LogprobEntry
from ecgvlm.serving.errors import ApiError
from ecgvlm.serving.limits import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    from ecgvlm.model.processor import PreparedImage

logger = logging.getLogger("ray.serve")


#: Requests with the same key run as one model call: (adapter, "generate", max_new_tokens,
#: temperature, seed) or (adapter, "choice") for constrained choices.
GroupKey = tuple[Any, ...]


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt for the PULSE replica; ``adapter`` None means the base model.

    With ``guided_choice`` the answer is the most probable of those strings after the
    trained answer prefix (one forward pass), not generated text. ``top_logprobs`` None
    asks for no log-probabilities of generated tokens; 0-20 for each token's with that many
    alternatives.
    """

    prompt: str
    image: bytes | None  # None: asked without an image (the language model alone)
    adapter: str | None = None
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int = 0
    guided_choice: tuple[str, ...] | None = None
    top_logprobs: int | None = None

    def group_key(self) -> GroupKey:
        """Requests sharing this key run as one ``generate`` (or scoring) call; asking for
        log-probabilities or not does not split a group."""
        seen = self.image is not None  # a batch has an image in every row or in none
        if self.guided_choice is not None:
            return (self.adapter, seen, "choice")
        return (self.adapter, seen, "generate", self.max_new_tokens, self.temperature, self.seed)


@dataclass(frozen=True)
class GenerateResult:
    """A generated answer, or with ``choice_logprobs`` (choice, log-probability normalised
    over the choices, most probable first) a constrained one whose ``text`` is that choice.
    ``token_logprobs``: each generated token's, when asked for."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    choice_logprobs: tuple[tuple[str, float], ...] | None = None
    token_logprobs: tuple[LogprobEntry, ...] | None = None
    #: Where the replica spent the request's time, ms: ``adapter`` (loading its adapter, on
    #: its first use), ``image`` (preparing its image), ``queue`` (waiting for its batch) and
    #: ``model`` (its batch's forward passes); set by the Serve replica, None elsewhere.
    timing_ms: dict[str, float] | None = None


@dataclass(frozen=True)
class StreamDelta:
    """What a streamed answer gained: text, and its new tokens' log-probabilities when asked
    for (a token may come before the text it completes is shown)."""

    text: str
    logprobs: tuple[LogprobEntry, ...] = ()

    @staticmethod
    def merge(deltas: Sequence[StreamDelta]) -> StreamDelta:
        return StreamDelta("".join(d.text for d in deltas),
                           tuple(e for d in deltas for e in d.logprobs))


@dataclass
class RequestHooks:
    """A request's replica-local ends (never sent across processes): where its stream goes
    (``on_delta``, called from the generating thread) and the flag its caller sets on
    leaving (``cancel``: the request stops at its next token)."""

    on_delta: Callable[[StreamDelta], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    #: When its batch started (``time.perf_counter``) and how long it ran, s.
    batch_started_s: float | None = None
    batch_s: float | None = None


#: Status of the answer a request gets when its caller left before it ran (nginx's
#: "client closed request"); nobody reads it.
CLIENT_CLOSED = 499


class _TextStream:
    """One streamed row: its tokens so far and the text already sent.

    Text goes out as it becomes final: ``processor.decode`` of the tokens so far, held back
    while it ends in a partial UTF-8 character (U+FFFD), and trailing white space waits for
    what follows it (the answer is stripped), so the pieces add up to the answer's text.
    """

    def __init__(self, decode: Callable[[list[int]], str], on_delta: Callable[[StreamDelta], None],
                 entry: Callable[[Any], LogprobEntry] | None) -> None:
        self.decode = decode
        self.on_delta = on_delta
        self.entry = entry
        self.ids: list[int] = []
        self.sent = ""
        self.pending: list[LogprobEntry] = []
        self.diverged = False

    def push(self, step: int, token: int, logprob: Any, eos: int) -> None:
        if step < len(self.ids):
            # A batch retried after running out of memory generates the row again.
            self.diverged = self.diverged or self.ids[step] != token
            return
        self.ids.append(token)
        if self.entry is not None and logprob is not None and token != eos:
            self.pending.append(self.entry(logprob))
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            text = self.sent
        self._send(text)

    def finish(self, text: str) -> None:
        if text.startswith(self.sent):
            self._send(text)
        else:
            logger.warning("streamed text %r is not a prefix of the answer %r", self.sent, text)

    def _send(self, text: str) -> None:
        if self.diverged or (text == self.sent and not self.pending):
            return
        delta = StreamDelta(text[len(self.sent):], tuple(self.pending))
        self.sent, self.pending = text, []
        self.on_delta(delta)


def group_requests(requests: Sequence[GenerateRequest]) -> dict[GroupKey, list[int]]:
    """Indices of ``requests`` grouped by adapter and mode/settings, in arrival order.

    A replica's batch may mix adapters, temperatures and constrained choices: each group is one
    forward pass with one adapter active.
    """
    groups: dict[GroupKey, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(req.group_key(), []).append(i)
    return groups


def read_adapter(path: str) -> tuple[Any, dict[str, Any]]:
    """A PEFT adapter directory's config and weights, ready to share base weights.

    The study trains with ``bias="lora_only"``, and PEFT refuses a second adapter on one model
    when any adapter's config names a bias mode. PULSE's language model (Llama) has no
    biases in the attention projections LoRA targets, so such an adapter holds no bias
    weights and is exactly a ``bias="none"`` adapter: it is loaded as one. An adapter that
    does carry bias weights would change the shared base, and is refused.

    Raises:
        ValueError: the directory is not a PEFT adapter, or the adapter trains biases.
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(path)
        weights = load_peft_weights(path, device="cpu")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable PEFT adapter directory: {e}") from e
    biases = [k for k in weights if k.endswith(".bias") and "lora_" not in k]
    if biases:
        raise ValueError(
            f"adapter {path} trains bias weights ({biases[0]}, ...): they would change the base "
            "weights every other model shares, so it cannot be multiplexed"
        )
    if getattr(config, "bias", "none") != "none":
        config.bias = "none"
    config.inference_mode = True
    return config, weights


#: What /v1/models shows of :meth:`PulseRunner.stats` for each pulse model.
RUNTIME_KEYS = ("device", "dtype", "attn_implementation", "max_batch_tokens")

#: Retry-After sent with a 503 for a request that ran out of device memory even alone: by
#: then the requests it was batched with have finished and their cache is freed.
OOM_RETRY_AFTER_S = 2.0


def resolve_device(device: str, cuda_available: bool, reserved_gpu_ids: list[Any] | None) -> str:
    """Where the replica's model goes.

    ``auto`` picks CUDA only when a GPU is there *and*, under Ray, reserved for this process:
    a Ray actor started with ``num_gpus=0`` still sees every GPU of its node, and weights put
    there share a card Ray hands to someone else.

    Args:
        device: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` too).
        cuda_available: ``torch.cuda.is_available()``.
        reserved_gpu_ids: ``ray.get_gpu_ids()`` inside a Ray worker; None outside Ray.
    """
    if device.startswith("cuda") and not cuda_available:
        raise ValueError(f"device {device}: torch sees no CUDA device in this process")
    if device != "auto":
        return device
    if not cuda_available:
        return "cpu"
    if reserved_gpu_ids is not None and not reserved_gpu_ids:
        logger.warning(
            "a GPU is visible but Ray reserved none for this replica (pulse.num_gpus is 0): "
            "running on CPU; set pulse.num_gpus: 1 (or auto) to use it"
        )
        return "cpu"
    return "cuda"


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on CUDA (PULSE-7B's 13.2 GiB instead of 26), float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def _reserved_gpu_ids() -> list[Any] | None:
    try:
        import ray
    except ImportError:
        return None
    return ray.get_gpu_ids() if ray.is_initialized() else None


class PulseRunner:
    """PULSE base weights loaded once, with LoRA adapters loaded onto the same weights.

    Adapters are PEFT directories. The first one wraps the base in a ``PeftModel``; later
    ones are added with ``load_adapter`` and chosen per group with ``set_adapter``; the base
    model answers inside ``disable_adapter()``. Switching never reloads the base weights.

    All model access holds one lock: Serve runs generation in a worker thread while the
    multiplexing cache may load or evict adapters. :meth:`stats` does not take it, so that
    readiness answers while a long batch runs.

    Args:
        model_dir: A PULSE checkpoint directory (``ecgvlm.model.load_pulse`` format).
        adapters: Adapter name -> PEFT directory; the names clients may ask for.
        dtype: Torch dtype name for the weights, or ``auto`` (see :func:`resolve_dtype`).
        device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (see :func:`resolve_device`).
        attn_implementation: ``sdpa``, ``flash_attention_2`` or ``eager``.
        max_batch_tokens: Token budget of one ``generate`` call (rows x (longest prompt +
            new tokens)); None derives it on CUDA from the memory free after loading, and
            sets none on CPU.
    """

    def __init__(
        self, model_dir: str, adapters: dict[str, str] | None = None, dtype: str = "auto",
        device: str = "auto", attn_implementation: str = "sdpa",
        max_batch_tokens: int | None = None,
    ) -> None:
        import torch

        from ecgvlm.infer import max_batch_tokens_for, memory_costs
        from ecgvlm.model import load_pulse

        self.device = resolve_device(device, torch.cuda.is_available(), _reserved_gpu_ids())
        self.dtype = resolve_dtype(dtype, self.device)
        self.adapter_paths = dict(adapters or {})
        self._lock = threading.RLock()
        from ecgvlm import storage

        # Models and adapters in an object store are copied to this node's disk once.
        self.model, self.processor = load_pulse(
            storage.node_local(model_dir), dtype=getattr(torch, self.dtype), device=self.device,
            attn_implementation=attn_implementation,
        )
        self.attn_implementation = self.model.config._attn_implementation
        self.memory = memory_costs(self.model)
        if max_batch_tokens is None and self.device.startswith("cuda"):
            free_bytes, _ = torch.cuda.mem_get_info(torch.device(self.device))
            max_batch_tokens = max_batch_tokens_for(free_bytes, self.memory)
        self.max_batch_tokens = max_batch_tokens
        logger.info(
            "PULSE on %s in %s (%s attention); batch token budget %s", self.device, self.dtype,
            self.attn_implementation, max_batch_tokens or "none",
        )
        self.base_loads = 1
        self.adapter_loads: Counter = Counter()
        self.out_of_memory_events = 0
        # Requests inside generate() not yet answered, and those stopped because their
        # client left (streams and plain requests alike).
        self.in_flight = 0
        self.cancelled = 0
        self.batches = 0  # generate calls (a replica's batch each) and the requests they held
        self.batched_requests = 0
        self._counts_lock = threading.Lock()
        self._loaded: list[str] = []

    @property
    def loaded_adapters(self) -> list[str]:
        # A copy of a list another thread appends to: atomic under the GIL, no lock needed.
        return list(self._loaded)

    def load_adapter(self, name: str) -> None:
        """Load adapter ``name`` onto the base weights (no-op when already loaded)."""
        if name not in self.adapter_paths:
            raise KeyError(f"unknown adapter {name!r}; known: {sorted(self.adapter_paths)}")
        with self._lock:
            if name in self._loaded:
                return
            from ecgvlm import storage

            config, weights = read_adapter(storage.node_local(self.adapter_paths[name]))
            from peft import PeftModel
            from peft.utils import set_peft_model_state_dict

            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, config)
            else:
                self.model = PeftModel(self.model, config, adapter_name=name)
            result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
            if result.unexpected_keys:
                self.model.delete_adapter(name) if len(self._loaded) else None
                raise ValueError(
                    f"adapter {name} ({self.adapter_paths[name]}) does not fit this base "
                    f"model: unexpected weights {result.unexpected_keys[:5]}"
                )
            self.model.eval()
            self._loaded.append(name)
            self.adapter_loads[name] += 1

    def unload_adapter(self, name: str) -> None:
        """Free adapter ``name``'s weights; the last loaded adapter stays (PEFT needs one)."""
        with self._lock:
            if name not in self._loaded or len(self._loaded) == 1:
                return
            self.model.delete_adapter(name)
            self._loaded.remove(name)

    def _check_context(
        self, requests: Sequence[GenerateRequest], images: Sequence[Any] | None
    ) -> tuple[list[int], dict[int, ApiError]]:
        """Each request's prompt length, and a 400 for each one whose prompt (or answer)
        does not fit the model's context."""
        from ecgvlm.infer import PromptTooLongError, check_context, prompt_tokens

        errors = {}
        lengths = prompt_tokens(self.model, self.processor, [r.prompt for r in requests], images)
        for i, (req, n) in enumerate(zip(requests, lengths)):
            try:
                check_context(self.model, [n], 1 if req.guided_choice else req.max_new_tokens)
            except PromptTooLongError as e:
                param = "max_tokens" if e.new_tokens_at_fault else "messages"
                errors[i] = ApiError(400, f"{param}: the prompt {e.detail}", param=param,
                                     code="context_length_exceeded")
        return lengths, errors

    def prepare_image(self, image: bytes) -> PreparedImage:
        """A request's image decoded, tiled and normalised, ready for any batch. The Serve
        replica calls it as each request arrives, on a thread of its own, so that the batch's
        thread (which holds the model) does only the model's work.

        Raises:
            PIL.UnidentifiedImageError, ImageInputError: an image the gateway should have
                refused (it checks every image before the request reaches a replica).
        """
        from PIL import Image

        return self.processor.prepare_image(Image.open(io.BytesIO(image)).convert("RGB"))

    def generate(
        self, requests: Sequence[GenerateRequest],
        hooks: Sequence[RequestHooks | None] | None = None,
        prepared: Sequence[PreparedImage | None] | None = None,
    ) -> list[GenerateResult | ApiError]:
        """Answer a batch, one ``generate`` call per (adapter, settings) group and token budget.

        Args:
            requests: The batch, in arrival order.
            hooks: Per request (or None), where its stream goes and its cancel flag: a
                request whose flag is set is not started, or stops at its next token.
            prepared: Per request (or None), its image from :meth:`prepare_image`; a request
                with an image and none here has it prepared in the batch.

        Returns, per request, its result or the error that is its answer: a 400 for a prompt
        over the model's context, a 503 with ``retry_after_s`` for one that ran out of device
        memory even alone. The other requests of the batch are answered either way.
        """
        hooks = list(hooks) if hooks is not None else [None] * len(requests)
        prepared = list(prepared) if prepared is not None else [None] * len(requests)
        results: list[GenerateResult | ApiError | None] = [None] * len(requests)
        self._count(in_flight=len(requests), batches=1, batched_requests=len(requests))
        answered = 0
        try:
            for key, idxs in group_requests(requests).items():
                self._run_group(key, idxs, requests, hooks, prepared, results)
                self._count(in_flight=-len(idxs))
                answered += len(idxs)
        finally:
            self._count(in_flight=answered - len(requests))
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _run_group(
        self, key: GroupKey, idxs: list[int], requests: Sequence[GenerateRequest],
        hooks: Sequence[RequestHooks | None], prepared: Sequence[PreparedImage | None],
        results: list[GenerateResult | ApiError | None],
    ) -> None:
        import contextlib

        from ecgvlm.infer import generate_batched, score_choices_batched

        adapter = key[0]
        for i in idxs:
            if hooks[i] is not None and hooks[i].cancel.is_set():  # its caller already left
                results[i] = ApiError(CLIENT_CLOSED, "the client closed the request",
                                      code="client_closed")
                self._count(cancelled=1)
        idxs = [i for i in idxs if results[i] is None]
        if not idxs:
            return
        images = ([self.prepare_image(requests[i].image) if prepared[i] is None else prepared[i]
                   for i in idxs] if key[1] else None)
        lengths, errors = self._check_context([requests[i] for i in idxs], images)
        for k, error in errors.items():
            results[idxs[k]] = error
        keep = [idxs[k] for k in range(len(idxs)) if k not in errors]
        if not keep:
            return
        prompts = [requests[i].prompt for i in keep]
        kept_images = (None if images is None
                       else [images[k] for k in range(len(idxs)) if k not in errors])
        kept_lengths = [lengths[k] for k in range(len(idxs)) if k not in errors]
        streams = {row: self._text_stream(requests[i], hooks[i]) for row, i in enumerate(keep)
                   if hooks[i] is not None and hooks[i].on_delta is not None}
        with self._lock:
            if adapter is None:
                ctx = (self.model.disable_adapter() if self._loaded
                       else contextlib.nullcontext())
            else:
                self.load_adapter(adapter)
                self.model.set_adapter(adapter)
                ctx = contextlib.nullcontext()
            with ctx:
                if key[2] == "choice":
                    outs = score_choices_batched(
                        self.model, self.processor, prompts, kept_images,
                        [requests[i].guided_choice for i in keep],
                        max_batch_tokens=self.max_batch_tokens, prompt_lengths=kept_lengths,
                    )
                else:
                    _, _, _, max_new_tokens, temperature, seed = key
                    eos = self.processor.tokenizer.eos_token_id
                    wanted = [requests[i].top_logprobs for i in keep
                              if requests[i].top_logprobs is not None]

                    def on_token(row: int, step: int, token: int, logprob: Any) -> None:
                        if row in streams:
                            streams[row].push(step, token, logprob, eos)

                    def is_cancelled(row: int) -> bool:
                        return hooks[keep[row]] is not None and hooks[keep[row]].cancel.is_set()

                    outs = generate_batched(
                        self.model, self.processor, prompts, kept_images,
                        max_new_tokens=max_new_tokens, max_batch_tokens=self.max_batch_tokens,
                        prompt_lengths=kept_lengths, temperature=temperature, seed=seed,
                        top_logprobs=max(wanted) if wanted else None,
                        on_token=on_token if streams else None, is_cancelled=is_cancelled,
                    )
        for row, (i, out) in enumerate(zip(keep, outs)):
            results[i] = self._result(out, requests[i].top_logprobs, streams.get(row))

    def _text_stream(self, req: GenerateRequest, hooks: RequestHooks) -> _TextStream:
        assert hooks.on_delta is not None
        k = req.top_logprobs
        entry = None if k is None else (lambda logprob: self._logprob_entry(logprob, k))
        return _TextStream(self.processor.decode, hooks.on_delta, entry)

    def _logprob_entry(self, logprob: Any, k: int) -> LogprobEntry:
        """An ``ecgvlm.infer.TokenLogprob`` as the API shows it, with ``k`` alternatives."""
        token_bytes = self.processor.tokenizer.token_bytes
        top = tuple(LogprobEntry.of(token_bytes(t), lp) for t, lp in logprob.top[:k])
        return LogprobEntry.of(token_bytes(logprob.token_id), logprob.logprob, top)

    def _count(self, in_flight: int = 0, cancelled: int = 0, batches: int = 0,
               batched_requests: int = 0) -> None:
        with self._counts_lock:
            self.in_flight += in_flight
            self.cancelled += cancelled
            self.batches += batches
            self.batched_requests += batched_requests

    def _result(self, out: Any, top_logprobs: int | None = None,
                stream: _TextStream | None = None) -> GenerateResult | ApiError:
        from ecgvlm.infer import ChoiceScores, OutOfMemory

        if isinstance(out, OutOfMemory):
            self.out_of_memory_events += 1
            return ApiError(
                503, f"{out.message}; retry, or ask for fewer max_tokens",
                "service_unavailable", code="out_of_memory", retry_after_s=OOM_RETRY_AFTER_S,
            )
        if isinstance(out, ChoiceScores):
            ranked = tuple(sorted(out.logprobs.items(), key=lambda kv: -kv[1]))
            return GenerateResult(out.best, out.prompt_tokens, 1, ranked)
        if out.cancelled:
            self._count(cancelled=1)
        if stream is not None:
            if stream.diverged:
                self.out_of_memory_events += 1
                return ApiError(
                    503, "ran out of device memory while streaming, and the answer generated "
                    "again differs from the part already sent; retry",
                    "service_unavailable", code="out_of_memory", retry_after_s=OOM_RETRY_AFTER_S)
            stream.finish(out.text)
        entries = None
        if top_logprobs is not None and out.logprobs is not None:
            entries = tuple(self._logprob_entry(lp, top_logprobs) for lp in out.logprobs)
        return GenerateResult(out.text, out.prompt_tokens, out.completion_tokens,
                              token_logprobs=entries)

    def stats(self) -> dict[str, Any]:
        """What /readyz and /v1/models report; never waits for a running batch.

        ``in_flight``: requests handed to :meth:`generate` and not answered yet;
        ``cancelled``: requests stopped (or never started) because their client left;
        ``batches`` and ``batched_requests``: calls of :meth:`generate` (one batch of the
        replica's ``BatchQueue`` each) and the requests they held, so their ratio is the mean
        batch size."""
        return {
            "base_loads": self.base_loads,
            "adapters_loaded": self.loaded_adapters,
            "adapter_loads": dict(self.adapter_loads),
            "device": self.device,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "max_batch_tokens": self.max_batch_tokens,
            "out_of_memory_events": self.out_of_memory_events,
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
        }

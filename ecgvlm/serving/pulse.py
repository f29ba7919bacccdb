"""PULSE on a replica: one base model, LoRA adapters sharing its weights, grouped batches."""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ecgvlm.serving.limits import DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class GenerateRequest:
    """One prompt for the PULSE replica; ``adapter`` None means the base model."""

    prompt: str
    image: bytes
    adapter: str | None = None
    max_new_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    seed: int = 0

    def group_key(self) -> tuple[str | None, int, float, int]:
        """Requests sharing this key run as one ``generate`` call."""
        return (self.adapter, self.max_new_tokens, self.temperature, self.seed)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int


def group_requests(
    requests: Sequence[GenerateRequest],
) -> dict[tuple[str | None, int, float, int], list[int]]:
    """Indices of ``requests`` grouped by adapter and sampling settings, in arrival order.

    A Serve batch may mix adapters (and temperatures): each group is one forward pass with
    one adapter active.
    """
    groups: dict[tuple[str | None, int, float, int], list[int]] = {}
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


class PulseRunner:
    """PULSE base weights loaded once, with LoRA adapters loaded onto the same weights.

    Adapters are PEFT directories. The first one wraps the base in a ``PeftModel``; later
    ones are added with ``load_adapter`` and chosen per group with ``set_adapter``; the base
    model answers inside ``disable_adapter()``. Switching never reloads the base weights.

    All model access holds one lock: Serve runs generation in a worker thread while the
    multiplexing cache may load or evict adapters.

    Args:
        model_dir: A PULSE checkpoint directory (``ecgvlm.model.load_pulse`` format).
        adapters: Adapter name -> PEFT directory; the names clients may ask for.
        dtype: Torch dtype name for the weights.
        device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (CUDA when available).
    """

    def __init__(
        self, model_dir: str, adapters: dict[str, str] | None = None, dtype: str = "float32",
        device: str = "auto",
    ) -> None:
        import torch

        from ecgvlm.model import load_pulse

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.adapter_paths = dict(adapters or {})
        self._lock = threading.RLock()
        self.model, self.processor = load_pulse(
            model_dir, dtype=getattr(torch, dtype), device=device
        )
        self.base_loads = 1
        self.adapter_loads: Counter = Counter()
        self._loaded: list[str] = []

    @property
    def loaded_adapters(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def load_adapter(self, name: str) -> None:
        """Load adapter ``name`` onto the base weights (no-op when already loaded)."""
        if name not in self.adapter_paths:
            raise KeyError(f"unknown adapter {name!r}; known: {sorted(self.adapter_paths)}")
        with self._lock:
            if name in self._loaded:
                return
            config, weights = read_adapter(self.adapter_paths[name])
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

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Answer a batch, one ``generate`` call per (adapter, settings) group."""
        import contextlib

        from PIL import Image

        from ecgvlm.infer import generate

        results: list[GenerateResult | None] = [None] * len(requests)
        for (adapter, max_new_tokens, temperature, seed), idxs in group_requests(requests).items():
            prompts = [requests[i].prompt for i in idxs]
            images = [Image.open(io.BytesIO(requests[i].image)).convert("RGB") for i in idxs]
            with self._lock:
                if adapter is None:
                    ctx = (self.model.disable_adapter() if self._loaded
                           else contextlib.nullcontext())
                else:
                    self.load_adapter(adapter)
                    self.model.set_adapter(adapter)
                    ctx = contextlib.nullcontext()
                with ctx:
                    gens = generate(
                        self.model, self.processor, prompts, images,
                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                    )
            for i, g in zip(idxs, gens):
                results[i] = GenerateResult(g.text, g.prompt_tokens, g.completion_tokens)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return {
            "base_loads": self.base_loads,
            "adapters_loaded": self.loaded_adapters,
            "adapter_loads": dict(self.adapter_loads),
            "device": self.device,
        }

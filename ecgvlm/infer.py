"""Generation with PULSE, shared by serving and training-time evaluation.

One function, :func:`generate`, turns prompts (each holding one ``<image>``; the llava_v1 text
itself comes from :mod:`ecgvlm.prompt`) and PIL images into :class:`Generation` records. It is
batch-safe: prompts are left-padded, so every row's answer starts right after its own prompt,
and a batch gives the same greedy answers as one prompt at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

# The most new tokens one call may ask for (an MCQ answer plus explanation needs a few hundred).
MAX_NEW_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class Generation:
    """One answer.

    Attributes:
        text: decoded answer, up to (not including) the first end-of-sequence token.
        prompt_tokens: tokens of the prompt, text plus image features, as the LM saw them.
        completion_tokens: tokens generated, the end-of-sequence token included if produced.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int


def _unwrap(model: Any) -> Any:
    """The PulseModel inside a PEFT or DeepSpeed wrapper (adapters stay active in place)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def generate(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[Generation]:
    """Answer each prompt about its image.

    Args:
        model: a PulseModel (or a PEFT model wrapping one).
        processor: its PulseProcessor.
        prompts: full prompt strings, one ``<image>`` each.
        images: one PIL image per prompt.
        max_new_tokens: at most this many new tokens per answer.
        temperature: 0 for greedy decoding, else sampling temperature.
        top_p: nucleus sampling mass when sampling.
        seed: seeds torch's generator for sampling (reproducible answers).

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
    base = _unwrap(model)
    batch = processor(list(prompts), list(images))
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
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    max_len = base.pulse_config.tokenizer_model_max_length or 1 << 62
    prompt_lengths = [
        min(int(m.sum()) - 1 + base.num_image_features((int(w), int(h))), max_len)
        for m, (w, h) in zip(batch["attention_mask"], batch["image_sizes"])
    ]
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
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        # Rows that finished early are padded with pad ids after their EOS; count up to EOS.
        out.append(
            Generation(
                text=processor.decode(ids[:n]),
                prompt_tokens=prompt_lengths[row],
                completion_tokens=n,
            )
        )
    return out

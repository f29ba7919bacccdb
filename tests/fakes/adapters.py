"""A LoRA adapter for the tiny PULSE checkpoint that changes its output, as a trained one does."""

from __future__ import annotations

from pathlib import Path


def make_random_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """The study's LoRA adapter (``attach_lora``: r=4, alpha=8, bias=lora_only, language
    model only) with random instead of zero B matrices, saved to ``out`` in PEFT's layout."""
    import torch

    from ecgvlm.model import attach_lora, load_pulse, save_adapter

    model, _ = load_pulse(model_dir)
    torch.manual_seed(seed)  # lora_A's initialisation
    peft_model = attach_lora(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return save_adapter(peft_model, out)

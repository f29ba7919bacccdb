"""LoRA on PULSE's language model only, as in the study (r=4, alpha=8, bias="lora_only").

The names ``q_proj/k_proj/v_proj/o_proj`` also exist in the CLIP tower
(``model.vision_tower.vision_tower.encoder.layers.N.self_attn.q_proj``), and those have biases
that ``bias="lora_only"`` would make trainable. Targets are therefore given as one regular
expression anchored at the language model's layers, ``model.layers.N.self_attn.<name>``,
which PEFT matches against each module's full name.

Adapters are plain PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``)
whose keys are LLaVA's own module names (the model mirrors LLaVA's tree). Tested on a tiny
checkpoint: an adapter written the way LLaVA's ``train.py`` names modules (``target_modules``
as the bare names of every language-model Linear, ``task_type: CAUSAL_LM``, ``.safetensors``
or ``.bin``) loads here and computes the same logits as its weights merged by hand; ours name
only modules that LLaVA's checkpoint keys name. Loading ours under LLaVA's own code has not
been run. LLaVA's ``non_lora_trainables.bin`` (e.g. a tuned projector saved next to the
adapter) is refused: merge it into the base checkpoint first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ecgvlm.config import check_choice, check_range

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LM_LAYER_PREFIX = r"model\.layers\.\d+\.self_attn\."
NON_LORA_FILE = "non_lora_trainables.bin"


def language_model_target_regex(target: Sequence[str] = ATTENTION_PROJECTIONS) -> str:
    """A PEFT ``target_modules`` regex for these projections in the LM's layers only."""
    if not target:
        raise ValueError("target must name at least one module, e.g. 'q_proj'")
    for name in target:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"target module names must be identifiers, got {name!r}")
    return LM_LAYER_PREFIX + "(" + "|".join(target) + ")"


def attach_lora(
    model: nn.Module,
    r: int = 4,
    alpha: int = 8,
    dropout: float = 0.05,
    bias: str = "lora_only",
    target: Sequence[str] = ATTENTION_PROJECTIONS,
) -> Any:
    """Wrap ``model`` (a PulseModel) in a PEFT model with LoRA on its language model only.

    Args:
        model: the base model; its own weights are frozen.
        r: LoRA rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the LoRA input.
        bias: ``none``, ``lora_only`` or ``all`` (PEFT's meaning; the study used lora_only).
        target: projection names inside each LM layer's ``self_attn``.

    Returns:
        A ``peft.PeftModel``; only the LoRA (and, per ``bias``, bias) parameters train.
    """
    from peft import LoraConfig, get_peft_model

    check_range("r", r, 1)
    check_range("alpha", alpha, 1e-9)
    check_range("dropout", dropout, 0.0, 1.0)
    check_choice("bias", bias, ("none", "lora_only", "all"))
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=language_model_target_regex(target),
    )
    return get_peft_model(model, config)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that will receive gradients."""
    return parameter_counts(model)[0]


def save_adapter(model: Any, out_dir: str | Path) -> Path:
    """Write the PEFT adapter directory (adapter weights and config only)."""
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out


def load_adapter(
    model: nn.Module, adapter_dir: str | Path, name: str | None = None, trainable: bool = False
) -> Any:
    """Load a PEFT adapter directory onto ``model`` and make it the active adapter.

    Args:
        model: a PulseModel, or a PeftModel that already holds other adapters.
        adapter_dir: a PEFT directory (``adapter_config.json`` + weights).
        name: adapter name (default: the directory's name).
        trainable: keep the adapter trainable (False: inference).

    Returns:
        The PeftModel with the adapter active.
    """
    from peft import PeftModel

    path = Path(adapter_dir)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    if (path / NON_LORA_FILE).is_file():
        # LLaVA's loader puts these weights (a tuned projector, ...) into the base model before
        # the LoRA; skipping them would silently answer with the untuned ones.
        raise ValueError(
            f"{path} holds {NON_LORA_FILE} (weights LLaVA trained next to the LoRA); "
            f"load_adapter applies only the PEFT adapter: merge those weights into the base "
            f"checkpoint first"
        )
    name = name or path.name
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
        model.set_adapter(name)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)


def unload_adapter(model: Any, name: str) -> Any:
    """Remove one adapter by name; with none left, return the bare base model."""
    if name not in model.peft_config:
        raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(model.peft_config)}")
    remaining = [n for n in model.peft_config if n != name]
    if not remaining:
        return model.unload()
    model.set_adapter(remaining[0])
    model.delete_adapter(name)
    return model


def merge_lora(model: Any) -> nn.Module:
    """Fold the active adapter into the base weights and return the plain PulseModel."""
    return model.merge_and_unload()

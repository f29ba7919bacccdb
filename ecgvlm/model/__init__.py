"""PULSE, the ECG vision-language model, loaded faithfully from LLaVA's original format.

``load_pulse(path)`` builds the model from transformers' CLIP and Llama blocks and returns it
with its processor; ``make_tiny_pulse(dir)`` writes a few-MB random checkpoint in the same
layout for tests and the demo; ``attach_lora`` adds the study's adapters to the language model
only; ``check_checkpoint`` checks a folder without torch. See docs/model.md.

The names below are imported from their modules when first used (PEP 562), so that
``from ecgvlm.model import check_checkpoint`` (a training driver's check before Ray starts)
does not import torch and transformers' model stack (5.3-5.7 s of a training driver's
checks on a 2-core machine; 0.6-0.7 s without them).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "ATTN_IMPLEMENTATIONS": "pulse",
    "CheckpointError": "checkpoint",
    "ExportError": "export",
    "IGNORE_INDEX": "processor",
    "IMAGE_TOKEN": "processor",
    "IMAGE_TOKEN_INDEX": "processor",
    "ImageInputError": "processor",
    "PULSE_7B_CONFIG": "config",
    "PreparedImage": "processor",
    "PromptError": "processor",
    "PulseConfig": "config",
    "PulseConfigError": "config",
    "PulseModel": "pulse",
    "PulseProcessor": "processor",
    "attach_lora": "lora",
    "check_checkpoint": "checkpoint",
    "check_model_dir": "checkpoint",
    "export_llava_next": "export",
    "llava_next_unpad_differs": "export",
    "load_adapter": "lora",
    "load_pulse": "pulse",
    "make_tiny_pulse": "tiny",
    "merge_lora": "lora",
    "save_adapter": "lora",
    "save_pulse_checkpoint": "export",
    "trainable_parameter_count": "lora",
    "unload_adapter": "lora",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return list(__all__)

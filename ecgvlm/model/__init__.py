"""PULSE, the ECG vision-language model, loaded faithfully from LLaVA's original format.

``load_pulse(path)`` builds the model from transformers' CLIP and Llama blocks and returns it
with its processor; ``make_tiny_pulse(dir)`` writes a few-MB random checkpoint in the same
layout for tests and the demo; ``attach_lora`` adds the study's adapters to the language model
only. See docs/model.md.
"""

from ecgvlm.model.config import PULSE_7B_CONFIG, PulseConfig, PulseConfigError
from ecgvlm.model.export import (
    ExportError,
    export_llava_next,
    llava_next_unpad_differs,
    save_pulse_checkpoint,
)
from ecgvlm.model.lora import (
    attach_lora,
    load_adapter,
    merge_lora,
    save_adapter,
    trainable_parameter_count,
    unload_adapter,
)
from ecgvlm.model.processor import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    ImageInputError,
    PromptError,
    PulseProcessor,
)
from ecgvlm.model.pulse import (
    ATTN_IMPLEMENTATIONS,
    CheckpointError,
    PulseModel,
    check_checkpoint,
    load_pulse,
)
from ecgvlm.model.tiny import make_tiny_pulse

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "PULSE_7B_CONFIG",
    "CheckpointError",
    "ExportError",
    "ImageInputError",
    "PromptError",
    "PulseConfig",
    "PulseConfigError",
    "PulseModel",
    "PulseProcessor",
    "attach_lora",
    "check_checkpoint",
    "export_llava_next",
    "llava_next_unpad_differs",
    "load_adapter",
    "load_pulse",
    "make_tiny_pulse",
    "merge_lora",
    "save_adapter",
    "save_pulse_checkpoint",
    "trainable_parameter_count",
    "unload_adapter",
]

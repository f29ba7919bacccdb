"""PULSE, the ECG vision-language model, loaded faithfully from LLaVA's original format.

``load_pulse(path)`` builds the model from transformers' CLIP and Llama blocks and returns it
with its processor; ``make_tiny_pulse(dir)`` writes a few-MB random checkpoint in the same
layout for tests and the demo; ``attach_lora`` adds the study's adapters to the language model
only. See docs/model.md.
"""

from ecgvlm.model.config import PulseConfig, PulseConfigError
from ecgvlm.model.processor import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    ImageInputError,
    PromptError,
    PulseProcessor,
)
from ecgvlm.model.pulse import CheckpointError, PulseModel, load_pulse
from ecgvlm.model.tiny import make_tiny_pulse

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "CheckpointError",
    "ImageInputError",
    "PromptError",
    "PulseConfig",
    "PulseConfigError",
    "PulseModel",
    "PulseProcessor",
    "load_pulse",
    "make_tiny_pulse",
]

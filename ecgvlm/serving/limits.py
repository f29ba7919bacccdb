"""Request limits and the served model names: the named constants every check uses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Defaults for ServeLimits; each request check names the limit it enforces.

#: Largest request body accepted, in bytes (a 12-lead 10 s WFDB upload is ~50 kB and a
#: 2200x1700 PNG printout ~1 MB; 16 MiB leaves room for JPEG photos of paper ECGs).
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Largest decoded image, in pixels (width * height); 4096 x 4096.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Most images in one chat request (PULSE sees one; the proxy forwards up to this many).
MAX_IMAGES_PER_REQUEST = 4
#: Largest ``max_tokens`` a client may ask for.
MAX_TOKENS = 1024
#: Tokens generated when the client does not say.
DEFAULT_MAX_TOKENS = 256
#: Most messages in one chat request, and most characters of text across them.
MAX_MESSAGES = 64
MAX_TEXT_CHARS = 32_000
#: Signal bounds for /v1/ecg/interpret.
MIN_FS_HZ = 50.0
MAX_FS_HZ = 10_000.0
MAX_LEADS = 16
MIN_DURATION_S = 1.0
MAX_DURATION_S = 120.0
#: Window drawn from a signal longer than ``max_duration_s`` (a 30-min MIT-BIH recording), or
#: from ``start_s`` on, when the request gives no ``duration_s``: the training set's 10 s.
DEFAULT_WINDOW_S = 10.0
#: Multiple-choice options on /v1/ecg/interpret.
MIN_OPTIONS = 2
MAX_OPTIONS = 10

#: Most entries of ``guided_choice``, and most characters of one (letters A-Z, or short
#: findings).
MAX_CHOICES = 26
MAX_CHOICE_CHARS = 64
#: Most alternatives per token a client may ask for with ``top_logprobs`` (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

#: Names clients use for the served models.
PULSE_MODEL = "pulse"
LORA_MODEL = "pulse-lora"
GPT4O_MODEL = "gpt-4o"

IMAGE_MIME_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}


class ServeLimits(BaseModel):
    """Request limits, enforced by the ingress before any model sees a request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=64 * 64)
    max_images_per_request: int = Field(MAX_IMAGES_PER_REQUEST, ge=1)
    max_tokens: int = Field(MAX_TOKENS, ge=1)
    default_max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)
    max_messages: int = Field(MAX_MESSAGES, ge=1)
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1)
    max_duration_s: float = Field(MAX_DURATION_S, gt=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> ServeLimits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens "
                f"({self.max_tokens})"
            )
        return self

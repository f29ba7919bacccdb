"""PULSE's ``config.json``: which keys are read, what each does, and what is refused.

PULSE-7B ships in the original LLaVA repository's format: a ``LlamaConfig`` with
``model_type: "llava_llama"`` plus the multimodal ``mm_*`` keys that LLaVA's training script
writes. :class:`PulseConfig` reads exactly the keys that change what the model computes and
refuses values the LLaVA code would not run (or that we do not implement) with the key, the
value and the allowed values in the message.

Keys read (the rest of the file is the Llama language model's own config):

========================== =================================================================
``model_type``              ``llava_llama`` (LLaVA's Llama-based multimodal model, PULSE) or
                            ``llava`` (what stock LLaVA-1.5/1.6 checkpoints carry) with
                            ``architectures: ["LlavaLlamaForCausalLM"]``; transformers' own
                            ``llava`` format (``text_config``/``vision_config``) is refused.
``mm_vision_tower``         the CLIP vision tower: a known hub name (only its shape is used,
                            never downloaded) or a directory, relative to the checkpoint or
                            absolute, holding a CLIP ``config.json``.
``mm_vision_select_layer``  which CLIP hidden state feeds the projector (PULSE: ``-2``, the
                            second to last layer's output); required, as LLaVA fails without.
``unfreeze_mm_vision_tower`` where the CLIP weights come from: true, the checkpoint's own tower
                            weights (LLaVA-1.6, PULSE); false or absent, the standalone tower
                            named by ``mm_vision_tower`` (or ``vision_tower_path``), the
                            checkpoint's tower weights being ignored, as LLaVA's loader does.
``mm_vision_select_feature`` ``patch`` drops the CLS token, ``cls_patch`` keeps it.
``mm_projector_type``       ``linear`` or ``mlp{N}x_gelu`` (PULSE: ``mlp2x_gelu`` =
                            Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden)).
``mm_hidden_size``          width of the CLIP features (1024 for ViT-L/14).
``image_aspect_ratio``      must be ``anyres``: the image is tiled over the best grid in
                            ``image_grid_pinpoints`` plus one downscaled overview tile.
``image_grid_pinpoints``    candidate (width, height) canvases, multiples of the CLIP size.
``mm_patch_merge_type``     how tile features are laid out: ``flat`` (overview tile then each
                            tile's patches in raster order; LLaVA's default and most likely
                            PULSE's), ``spatial`` (tiles stitched into one grid) or
                            ``spatial_unpad`` (stitched, padding cropped away, one learned
                            ``image_newline`` vector after each row: LLaVA-1.6's layout).
``tokenizer_model_max_length`` sequences are cut to this many positions after the image
                            features are inserted, as LLaVA does.
``mm_use_im_start_end``     must be false (no ``<im_start>``/``<im_end>`` tokens).
``mm_use_im_patch_token``   must be present and false: true or absent makes LLaVA's loader
                            add an ``<im_patch>`` token and grow the embedding matrix with a
                            randomly initialised row, which cannot be reproduced.
========================== =================================================================
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ecgvlm.config import ConfigError, check_choice

MODEL_TYPES = ("llava_llama", "llava")
# The class LLaVA's code loads both model types with; transformers' LlavaForConditionalGeneration
# also says model_type "llava" but nests text_config/vision_config and names weights differently.
LLAVA_ARCHITECTURE = "LlavaLlamaForCausalLM"
SELECT_FEATURES = ("patch", "cls_patch")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
ASPECT_RATIOS = ("anyres",)
PROJECTOR_RE = re.compile(r"^(linear|mlp(\d+)x_gelu)$")

# Keys of config.json that belong to LLaVA's multimodal wrapper or its training run rather
# than to the Llama language model; they are kept out of the LlamaConfig.
MM_KEYS = frozenset(
    {
        "mm_vision_tower",
        "mm_vision_select_layer",
        "mm_vision_select_feature",
        "mm_projector_type",
        "mm_hidden_size",
        "mm_patch_merge_type",
        "mm_use_im_start_end",
        "mm_use_im_patch_token",
        "mm_projector_lr",
        "mm_vision_tower_lr",
        "mm_resampler_type",
        "image_aspect_ratio",
        "image_grid_pinpoints",
        "image_crop_resolution",
        "image_split_resolution",
        "tokenizer_model_max_length",
        "tokenizer_padding_side",
        "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter",
        "tune_mm_vision_resampler",
        "freeze_mm_vision_resampler",
        "unfreeze_mm_vision_tower",
        "use_mm_proj",
        "model_type",
        "architectures",
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
    }
)


# PULSE-7B's config.json as far as it can be known offline: LLaVA-1.6-Vicuna-7B's published
# config (PULSE's base, ``--model_name_or_path``) with what PULSE's finetune_pulse.sh and
# LLaVA's train.py write over it. train.py sets mm_patch_merge_type from its argument, whose
# default is 'flat' and which finetune_pulse.sh does not pass, hence 'flat' (LLaVA-1.6 itself:
# 'spatial_unpad'). Used for shape checks and the --random-7b GPU check; a real download's
# config.json always wins.
PULSE_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaLlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_aspect_ratio": "anyres",
    "image_crop_resolution": 224,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_split_resolution": 224,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "mm_hidden_size": 1024,
    "mm_patch_merge_type": "flat",
    "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None,
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    "mm_vision_tower_lr": 2e-06,
    "model_type": "llava_llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "tokenizer_model_max_length": 4096,
    "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16",
    "tune_mm_mlp_adapter": False,
    "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": True,
    "use_cache": True,
    "use_mm_proj": True,
    "vocab_size": 32000,
}


class PulseConfigError(ConfigError):
    """A PULSE ``config.json`` value we cannot load faithfully; the message names the key."""


@dataclasses.dataclass(frozen=True)
class PulseConfig:
    """The multimodal part of a PULSE (LLaVA ``llava_llama``) config, validated.

    Attributes:
        vision_tower: ``mm_vision_tower`` as written in config.json.
        vision_select_layer: index into CLIP's hidden states (``-2`` = penultimate layer).
        vision_select_feature: ``patch`` or ``cls_patch``.
        projector_type: ``linear`` or ``mlp{N}x_gelu``.
        mm_hidden_size: CLIP feature width.
        hidden_size: language model width (the projector's output).
        image_aspect_ratio: ``anyres``.
        image_grid_pinpoints: candidate canvases as (width, height) pairs.
        patch_merge_type: ``flat``, ``spatial`` or ``spatial_unpad``.
        tokenizer_model_max_length: cut merged sequences to this length (None: no cut).
        vision_tower_in_checkpoint: ``unfreeze_mm_vision_tower``: the CLIP weights come from
            the checkpoint (True) or from the standalone tower directory (False).
        text: the Llama language model's config keys (everything not multimodal).
    """

    vision_tower: str
    vision_select_layer: int = -2
    vision_select_feature: str = "patch"
    projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 1024
    hidden_size: int = 4096
    image_aspect_ratio: str = "anyres"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    patch_merge_type: str = "flat"
    tokenizer_model_max_length: int | None = None
    vision_tower_in_checkpoint: bool = True
    text: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("mm_vision_select_feature", self.vision_select_feature, SELECT_FEATURES)
        check_choice("mm_patch_merge_type", self.patch_merge_type, MERGE_TYPES)
        check_choice("image_aspect_ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        if not PROJECTOR_RE.match(self.projector_type):
            raise PulseConfigError(
                f"mm_projector_type must be 'linear' or 'mlp<N>x_gelu' (PULSE: 'mlp2x_gelu'), "
                f"got {self.projector_type!r}"
            )
        if self.patch_merge_type != "flat" and self.vision_select_feature != "patch":
            raise PulseConfigError(
                f"mm_patch_merge_type {self.patch_merge_type!r} lays patches out on a grid and "
                f"needs mm_vision_select_feature 'patch', got {self.vision_select_feature!r}"
            )
        if not self.image_grid_pinpoints:
            raise PulseConfigError("image_grid_pinpoints must list at least one (width, height)")
        for pair in self.image_grid_pinpoints:
            if len(pair) != 2 or min(pair) <= 0:
                raise PulseConfigError(
                    f"image_grid_pinpoints entries must be positive (width, height), got {pair!r}"
                )
        for name in ("mm_hidden_size", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PulseConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def projector_depth(self) -> int:
        """Number of Linear layers in the projector (1 for ``linear``)."""
        match = PROJECTOR_RE.match(self.projector_type)
        assert match is not None
        return 1 if match.group(2) is None else int(match.group(2))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PulseConfig:
        """Validate a parsed ``config.json``.

        Raises:
            PulseConfigError: on a missing key or a value LLaVA's code would not run the way
                PULSE was trained (the key and the allowed values are named).
        """
        model_type = data.get("model_type")
        if model_type not in MODEL_TYPES:
            raise PulseConfigError(
                f"model_type must be one of {', '.join(map(repr, MODEL_TYPES))} (LLaVA's "
                f"original format, as PULSE-7B ships), got {model_type!r}"
            )
        if model_type == "llava":
            architectures = data.get("architectures") or []
            if "text_config" in data or LLAVA_ARCHITECTURE not in architectures:
                raise PulseConfigError(
                    f"model_type 'llava' is loaded only in LLaVA's own format (architectures "
                    f"[{LLAVA_ARCHITECTURE!r}], no text_config), got architectures "
                    f"{architectures!r}"
                    + (
                        " with a text_config (transformers' LlavaForConditionalGeneration)"
                        if "text_config" in data
                        else ""
                    )
                )
        missing = [
            k
            for k in (
                "mm_vision_tower",
                "mm_hidden_size",
                "hidden_size",
                "image_grid_pinpoints",
                "mm_vision_select_layer",
            )
            if k not in data
        ]
        if missing:
            raise PulseConfigError(f"config.json lacks required key(s): {', '.join(missing)}")
        if "mm_use_im_patch_token" not in data:
            raise PulseConfigError(
                "config.json lacks mm_use_im_patch_token; LLaVA's loader then treats it as true "
                "and adds an <im_patch> token with a randomly initialised embedding row; add "
                '"mm_use_im_patch_token": false if the model was trained without it'
            )
        for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if data.get(flag, False):
                raise PulseConfigError(
                    f"{flag} must be false (PULSE's value); true is not supported, got "
                    f"{data[flag]!r}"
                )
        pinpoints = data["image_grid_pinpoints"]
        if isinstance(pinpoints, str):
            # LLaVA accepts the pinpoints as a Python literal string too.
            try:
                pinpoints = ast.literal_eval(pinpoints)
            except (ValueError, SyntaxError) as e:
                raise PulseConfigError(
                    f"image_grid_pinpoints is not a list of (width, height): {pinpoints!r}"
                ) from e
        try:
            pinpoints = tuple((int(w), int(h)) for w, h in pinpoints)
        except (TypeError, ValueError) as e:
            raise PulseConfigError(
                f"image_grid_pinpoints must be a list of (width, height), got {pinpoints!r}"
            ) from e
        text = {k: v for k, v in data.items() if k not in MM_KEYS}
        try:
            return cls(
                vision_tower=str(data["mm_vision_tower"]),
                vision_select_layer=int(data["mm_vision_select_layer"]),
                vision_select_feature=data.get("mm_vision_select_feature", "patch"),
                projector_type=data.get("mm_projector_type", "linear"),
                mm_hidden_size=data["mm_hidden_size"],
                hidden_size=data["hidden_size"],
                # LLaVA's own default is 'square'; anything but anyres is refused below.
                image_aspect_ratio=data.get("image_aspect_ratio", "square"),
                image_grid_pinpoints=pinpoints,
                patch_merge_type=data.get("mm_patch_merge_type", "flat"),
                tokenizer_model_max_length=data.get("tokenizer_model_max_length"),
                # LLaVA's CLIPVisionTower loads the tower at build time (so the checkpoint's
                # tower weights then overwrite it) only when this is true.
                vision_tower_in_checkpoint=bool(data.get("unfreeze_mm_vision_tower", False)),
                text=text,
            )
        except PulseConfigError:
            raise
        except ConfigError as e:
            raise PulseConfigError(str(e)) from e

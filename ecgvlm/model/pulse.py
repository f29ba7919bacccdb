"""PULSE (LLaVA ``llava_llama``) on transformers' CLIP and Llama building blocks.

The module tree mirrors LLaVA's ``LlavaLlamaForCausalLM`` so that checkpoint keys (and PEFT
adapter keys) are LLaVA's own, with no renaming:

- ``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``: the Llama LM;
- ``model.vision_tower.vision_tower.vision_model...``: transformers' ``CLIPVisionModel``;
- ``model.mm_projector.{0,2}``: the ``mlp2x_gelu`` projector (Linear, GELU, Linear);
- ``model.image_newline``: the row-end vector, only for ``spatial_unpad``.

An image becomes features like this (LLaVA ``prepare_inputs_labels_for_multimodal``): every
tile (overview + anyres grid) goes through CLIP; hidden state ``mm_vision_select_layer`` minus
the CLS token gives (tiles, patches, 1024); the projector maps them to the LM width; the merge
type orders them (see :mod:`ecgvlm.model.config`); the result replaces the prompt's one
``IMAGE_TOKEN_INDEX`` position. Labels get ``-100`` over the image features.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from ecgvlm.model.checkpoint import CheckpointError, check_checkpoint
from ecgvlm.model.config import PulseConfig, PulseConfigError
from ecgvlm.model.processor import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    PulseImageProcessor,
    PulseProcessor,
    anyres_grid_shape,
    num_image_tiles,
)

VISION_PREFIX = "model.vision_tower.vision_tower."
# On disk (LLaVA, transformers 4.x) CLIP's weights sit under ``vision_model.``; transformers 5's
# CLIPVisionModel has no such submodule, so that one path segment is added or removed here.
CLIP_DISK_PREFIX = "vision_model."
# Checkpoint keys that carry no weights we use: buffers older transformers saved, and
# LLaVA-1.6's image_newline that PULSE's checkpoint keeps although its merge type is flat
# (LLaVA's reference code ignores it the same way).
IGNORED_KEY_RE = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")


class PulseVisionTower(nn.Module):
    """LLaVA's ``CLIPVisionTower``: CLIP, then one hidden state with or without CLS."""

    def __init__(self, config: CLIPVisionConfig, select_layer: int, select_feature: str):
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)
        self.vision_tower.requires_grad_(False)
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def num_patches_per_side(self) -> int:
        cfg = self.vision_tower.config
        return cfg.image_size // cfg.patch_size

    def _clip_parts(self) -> tuple[nn.Module, nn.Module, nn.ModuleList]:
        # transformers 5's CLIPVisionModel holds these directly; 4.x under ``vision_model``.
        clip = getattr(self.vision_tower, "vision_model", self.vision_tower)
        return clip.embeddings, clip.pre_layrnorm, clip.encoder.layers

    @property
    def layers_run(self) -> int:
        """Encoder layers that produce hidden state ``select_layer`` (index 0: embeddings)."""
        n_layers = len(self._clip_parts()[2])
        return self.select_layer if self.select_layer >= 0 else n_layers + 1 + self.select_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's hidden state ``select_layer`` (LLaVA's ``hidden_states[select_layer]``).

        Computed directly (embeddings, pre-layernorm, the first layers) rather than with
        ``output_hidden_states=True``: transformers 5 records hidden states with hooks that a
        forward of the whole model with ``output_hidden_states`` installs a second time, after
        which every layer is recorded twice and ``[-2]`` silently becomes the last layer. This
        also skips the layers after the selected one and keeps no other hidden states.
        """
        embeddings, pre_layernorm, layers = self._clip_parts()
        # The tower is frozen in PULSE and LLaVA runs it without gradients.
        with torch.no_grad():
            param = next(self.vision_tower.parameters())
            hidden = pre_layernorm(
                embeddings(pixel_values.to(device=param.device, dtype=param.dtype))
            )
            for layer in layers[: self.layers_run]:
                hidden = _run_clip_layer(layer, hidden)
            if self.select_feature == "patch":
                hidden = hidden[:, 1:]
        return hidden.to(pixel_values.dtype)


def _run_clip_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer without a mask, under transformers 4.x's or 5.x's signature."""
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # 4.x
        out = layer(hidden, None, None)
    else:
        out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def build_projector(config: PulseConfig) -> nn.Module:
    """``linear`` or ``mlp{N}x_gelu`` exactly as LLaVA builds it (indices 0, 2, ... are Linear)."""
    layers: list[nn.Module] = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(1, config.projector_depth):
        layers += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
    return layers[0] if config.projector_type == "linear" else nn.Sequential(*layers)


def unpad_features(features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Crop the black bars anyres added from a (C, H, W) feature map, as LLaVA's unpad_image."""
    width, height = int(image_size[0]), int(image_size[1])
    cur_h, cur_w = features.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        return features[:, pad : cur_h - pad, :]
    new_w = int(width * (cur_h / height))
    pad = (cur_w - new_w) // 2
    return features[:, :, pad : cur_w - pad]


# transformers 5 names the KV cache argument ``cache`` and warns on every ``past_key_values``
# (which its own ``generate`` and older callers still pass), and on reading an output's
# ``past_key_values``; transformers 4 knows only that name.
CACHE_KWARG = ("cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
               else "past_key_values")


def kv_cache(output: Any) -> Any:
    """The KV cache of a forward's output, read under this transformers' name for it."""
    return getattr(output, CACHE_KWARG)


class PulseModel(LlamaForCausalLM):
    """PULSE: a ``LlamaForCausalLM`` whose ``model`` also holds the CLIP tower and projector.

    Being a ``LlamaForCausalLM`` (a transformers ``PreTrainedModel``), it works with PEFT's
    ``get_peft_model``, DeepSpeed, gradient checkpointing and ``generate``.
    """

    def __init__(
        self, config: LlamaConfig, pulse_config: PulseConfig, vision_config: CLIPVisionConfig
    ):
        super().__init__(config)
        self.pulse_config = pulse_config
        self.model.vision_tower = PulseVisionTower(
            vision_config, pulse_config.vision_select_layer, pulse_config.vision_select_feature
        )
        self.model.mm_projector = build_projector(pulse_config)
        if "unpad" in pulse_config.patch_merge_type:
            self.model.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
        self.padding_side = "left"
        # transformers picks the loss from the class name; ours does not end in ForCausalLM.
        # This is LLaVA's loss too: mean next-token cross-entropy over labels != -100.
        self.loss_type = "ForCausalLM"

    # -- image features ---------------------------------------------------------------------

    @property
    def tile_px(self) -> int:
        return int(self.model.vision_tower.vision_tower.config.image_size)

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """CLIP tiles for an image of (width, height): anyres grid plus the overview."""
        return num_image_tiles(image_size, self.pulse_config.image_grid_pinpoints, self.tile_px)

    def num_image_features(self, image_size: tuple[int, int]) -> int:
        """How many positions an image of (width, height) takes in the LM's sequence."""
        tower = self.model.vision_tower
        side = tower.num_patches_per_side
        per_tile = side * side + (0 if tower.select_feature == "patch" else 1)
        tiles = self.num_tiles(image_size)
        merge = self.pulse_config.patch_merge_type
        if merge != "spatial_unpad":
            return tiles * per_tile
        if tiles == 1:
            return per_tile + 1
        across, down = anyres_grid_shape(
            image_size, self.pulse_config.image_grid_pinpoints, self.tile_px
        )
        shape = unpad_features(torch.empty(0, down * side, across * side), image_size).shape
        return per_tile + shape[1] * (shape[2] + 1)

    def image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Projected, merged features per image: a list of (n_features, hidden) tensors."""
        sizes = [(int(w), int(h)) for w, h in image_sizes]
        counts = [self.num_tiles(size) for size in sizes]
        if pixel_values.ndim != 5 or pixel_values.shape[0] != len(sizes):
            raise ValueError(
                f"pixel_values must be (batch, tiles, 3, H, W) with one row per image_sizes "
                f"entry, got {tuple(pixel_values.shape)} for {len(sizes)} image size(s)"
            )
        if max(counts) > pixel_values.shape[1]:
            raise ValueError(
                f"image_sizes need up to {max(counts)} tiles, pixel_values has "
                f"{pixel_values.shape[1]}"
            )
        tiles = torch.cat([pixel_values[i, :n] for i, n in enumerate(counts)])
        projected = self.model.mm_projector(self.model.vision_tower(tiles.to(self.dtype)))
        per_image = torch.split(projected, counts, dim=0)
        return [self._merge_tiles(f, size) for f, size in zip(per_image, sizes)]

    def _merge_tiles(self, features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        merge = self.pulse_config.patch_merge_type
        if merge == "flat":
            return features.flatten(0, 1)
        side = self.model.vision_tower.num_patches_per_side
        base, grid = features[0], features[1:]
        if grid.shape[0] == 0:
            if "unpad" in merge:
                return torch.cat((base, self.model.image_newline[None].to(base)), dim=0)
            return base
        across, down = anyres_grid_shape(
            image_size, self.pulse_config.image_grid_pinpoints, self.tile_px
        )
        grid = grid.view(down, across, side, side, -1)
        if "unpad" in merge:
            # (C, rows of patches, columns of patches) over the whole canvas.
            grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            grid = unpad_features(grid, image_size)
            newline = self.model.image_newline[:, None, None].expand(*grid.shape[:-1], 1)
            grid = torch.cat((grid, newline.to(grid)), dim=-1)
            grid = grid.flatten(1, 2).transpose(0, 1)
        else:
            grid = grid.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base, grid), dim=0)

    # -- inputs -------------------------------------------------------------------------

    def merge_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | Sequence[Sequence[int]],
        labels: torch.Tensor | None = None,
        padding_side: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Replace each prompt's ``IMAGE_TOKEN_INDEX`` with its image's features.

        Padding in ``input_ids`` (``attention_mask == 0``) is dropped first, then the merged
        sequences are padded again on ``padding_side`` (default: the model's, ``left``).

        Returns:
            ``inputs_embeds`` (B, L, H), ``attention_mask`` (B, L), ``position_ids`` (B, L),
            ``labels`` (B, L) or None.
        """
        side = padding_side or self.padding_side
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = self.image_features(pixel_values, image_sizes)
        embed = self.get_input_embeddings()
        rows_embeds, rows_labels = [], []
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask.bool())):
            ids = ids[mask]
            row_labels = (
                labels[row][mask] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            )
            where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
            if len(where) != 1:
                raise ValueError(
                    f"row {row} of input_ids has {len(where)} image tokens "
                    f"({IMAGE_TOKEN_INDEX}); each prompt takes exactly one image"
                )
            at = where[0]
            text = embed(torch.cat((ids[:at], ids[at + 1 :])))
            feats = features[row].to(text.dtype)
            rows_embeds.append(torch.cat((text[:at], feats, text[at:])))
            image_labels = torch.full(
                (feats.shape[0],), IGNORE_INDEX, dtype=row_labels.dtype, device=row_labels.device
            )
            rows_labels.append(torch.cat((row_labels[:at], image_labels, row_labels[at + 1 :])))
        max_len = self.pulse_config.tokenizer_model_max_length
        if max_len is not None:
            rows_embeds = [e[:max_len] for e in rows_embeds]
            rows_labels = [lab[:max_len] for lab in rows_labels]
        width = max(e.shape[0] for e in rows_embeds)
        batch = len(rows_embeds)
        hidden = rows_embeds[0].shape[1]
        device = rows_embeds[0].device
        out_embeds = rows_embeds[0].new_zeros((batch, width, hidden))
        out_mask = torch.zeros((batch, width), dtype=attention_mask.dtype, device=device)
        out_pos = torch.zeros((batch, width), dtype=torch.long, device=device)
        out_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long, device=device)
        for row, (e, lab) in enumerate(zip(rows_embeds, rows_labels)):
            n = e.shape[0]
            span = slice(width - n, width) if side == "left" else slice(0, n)
            out_embeds[row, span] = e
            out_mask[row, span] = 1
            out_pos[row, span] = torch.arange(n, device=device)
            out_labels[row, span] = lab
        return out_embeds, out_mask, out_pos, (out_labels if labels is not None else None)

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> Any:
        """Causal LM forward; with ``pixel_values`` the image features are merged in first.

        ``labels`` align with ``input_ids`` (-100 where no loss is wanted); the returned
        ``logits`` align with the merged sequence (padded on ``self.padding_side``).
        ``logits_to_keep`` (Llama's: 0 keeps all, N the last N positions) is named here so
        that ``generate`` passes 1 at prefill: a batch of 8 prompts of 3,000 tokens would
        otherwise compute 8 x 3,000 x 32,000 logits (~1.5 GiB in bf16) to use 8 x 32,000.
        """
        if pixel_values is not None and inputs_embeds is None:
            if image_sizes is None:
                raise ValueError("image_sizes is required with pixel_values")
            inputs_embeds, attention_mask, position_ids, labels = self.merge_inputs(
                input_ids, attention_mask, pixel_values, image_sizes, labels
            )
            input_ids = None
        if CACHE_KWARG != "past_key_values" and "past_key_values" in kwargs:
            kwargs.setdefault(CACHE_KWARG, kwargs.pop("past_key_values"))
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Generate after the prompt; returns only the NEW token ids (B, new_len).

        Sequences are left-padded after the image merge, so every row continues right after
        its own prompt.
        """
        if pixel_values is None:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds, mask, _, _ = self.merge_inputs(
            input_ids, attention_mask, pixel_values, image_sizes, padding_side="left"
        )
        return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


# -- loading ------------------------------------------------------------------------------


def _clip_has_inner_prefix(model: PulseModel) -> bool:
    return hasattr(model.model.vision_tower.vision_tower, "vision_model")


def to_checkpoint_key(model: PulseModel, key: str) -> str:
    """Our parameter name -> LLaVA's checkpoint key."""
    if key.startswith(VISION_PREFIX) and not _clip_has_inner_prefix(model):
        return VISION_PREFIX + CLIP_DISK_PREFIX + key[len(VISION_PREFIX) :]
    return key


def from_checkpoint_key(model: PulseModel, key: str) -> str:
    """LLaVA's checkpoint key -> our parameter name."""
    inner = VISION_PREFIX + CLIP_DISK_PREFIX
    if key.startswith(inner) and not _clip_has_inner_prefix(model):
        return VISION_PREFIX + key[len(inner) :]
    return key


def checkpoint_state_dict(model: PulseModel) -> dict[str, torch.Tensor]:
    """The model's weights under LLaVA's checkpoint keys."""
    return {to_checkpoint_key(model, k): v for k, v in model.state_dict().items()}


def _format_keys(keys: Sequence[str], limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


#: Attention kernels ``load_pulse`` accepts (transformers' names): SDPA is the default
#: everywhere; flash-attention 2 where the ``flash-attn`` package is installed (CUDA, bf16/fp16).
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


def check_attn_implementation(name: str) -> None:
    """Refuse an unknown attention kernel, or flash-attention 2 where it is not installed."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {name!r}"
        )
    if name == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise ValueError(
                "attn_implementation flash_attention_2 needs the flash-attn package and a CUDA "
                "device, and this environment has not both; use sdpa"
            )


def build_pulse(
    config_dict: dict[str, Any],
    vision_config: CLIPVisionConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> PulseModel:
    """An uninitialised-by-checkpoint PulseModel of the shape ``config_dict`` describes."""
    pulse_config = PulseConfig.from_dict(config_dict)
    if vision_config.hidden_size != pulse_config.mm_hidden_size:
        raise PulseConfigError(
            f"mm_hidden_size {pulse_config.mm_hidden_size} does not match the CLIP tower's "
            f"hidden_size {vision_config.hidden_size}"
        )
    layers = vision_config.num_hidden_layers
    if not -(layers + 1) <= pulse_config.vision_select_layer <= layers:
        raise PulseConfigError(
            f"mm_vision_select_layer must index CLIP's {layers + 1} hidden states, got "
            f"{pulse_config.vision_select_layer}"
        )
    for w, h in pulse_config.image_grid_pinpoints:
        if w % vision_config.image_size or h % vision_config.image_size:
            raise PulseConfigError(
                f"image_grid_pinpoints entry {(w, h)} is not a multiple of the CLIP image size "
                f"{vision_config.image_size}"
            )
    text = dict(pulse_config.text)
    text.setdefault("tie_word_embeddings", False)
    llama_config = LlamaConfig(**text)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch dtype, got {dtype}")
    check_attn_implementation(attn_implementation)
    llama_config._attn_implementation = attn_implementation
    vision_config._attn_implementation = attn_implementation
    with torch.device(device), _default_dtype(dtype):
        model = PulseModel(llama_config, pulse_config, vision_config)
    return model


def load_weights(
    model: PulseModel,
    files: dict[str, Path],
    vision_dir: Path | None = None,
    tower_from_dir: bool = False,
) -> list[str]:
    """Copy checkpoint tensors into ``model``; refuse missing or unexpected keys by name.

    Args:
        model: the freshly built model.
        files: checkpoint key -> safetensors file.
        vision_dir: a standalone CLIP directory with ``vision_model.*`` safetensors weights.
        tower_from_dir: take the tower from ``vision_dir`` and ignore the checkpoint's tower
            weights (``unfreeze_mm_vision_tower`` false). Otherwise ``vision_dir`` only fills
            in a checkpoint that holds no tower weights at all.

    Returns:
        The checkpoint keys that were deliberately ignored (old buffers, unused newline, the
        checkpoint's tower when ``tower_from_dir``).
    """
    from safetensors import safe_open

    expected = checkpoint_state_dict(model)
    sources: dict[str, tuple[Path, str]] = {k: (f, k) for k, f in files.items()}
    tower_ignored: list[str] = []
    if tower_from_dir:
        assert vision_dir is not None, "load_pulse checks that the tower directory has weights"
        tower_ignored = [k for k in sources if k.startswith(VISION_PREFIX)]
        for k in tower_ignored:
            del sources[k]
    if vision_dir is not None and not any(k.startswith(VISION_PREFIX) for k in sources):
        for vf in sorted(vision_dir.glob("*.safetensors")):
            with safe_open(str(vf), framework="pt") as f:
                for k in f.keys():
                    if k.startswith(CLIP_DISK_PREFIX):
                        sources[VISION_PREFIX + k] = (vf, k)
    ignored = [
        k
        for k in sources
        if k not in expected and (IGNORED_KEY_RE.search(k) or k == "model.image_newline")
    ]
    unexpected = sorted(set(sources) - set(expected) - set(ignored))
    missing = sorted(set(expected) - set(sources))
    problems = []
    if missing:
        hint = ""
        if any(k.startswith(VISION_PREFIX) for k in missing):
            hint = " (vision tower weights absent: pass vision_tower_path to a local CLIP dir)"
        problems.append(f"missing {len(missing)} key(s){hint}: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_format_keys(unexpected)}")
    if problems:
        raise CheckpointError("checkpoint does not match the PULSE config: " + "; ".join(problems))
    ignored += tower_ignored
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for key in expected:
        path, src_key = sources[key]
        by_file.setdefault(path, []).append((key, src_key))
    from tqdm.auto import tqdm

    shards = tqdm(by_file.items(), desc="loading shards", unit="shard", disable=len(by_file) < 3)
    with torch.no_grad():
        for path, pairs in shards:
            with safe_open(str(path), framework="pt") as f:
                for key, src_key in pairs:
                    tensor = f.get_tensor(src_key)
                    target = expected[key]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"{key} in {path.name} has shape {tuple(tensor.shape)}, the config "
                            f"implies {tuple(target.shape)}"
                        )
                    target.copy_(tensor.to(dtype=target.dtype))
    return sorted(ignored)


def load_pulse(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vision_tower_path: str | Path | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[PulseModel, PulseProcessor]:
    """Load a PULSE checkpoint in the original LLaVA layout from a local directory.

    Args:
        path: directory with ``config.json`` (``llava_llama``), safetensors weights (sharded
            with ``model.safetensors.index.json`` or one ``model.safetensors``),
            ``tokenizer.model`` and ``tokenizer_config.json``.
        dtype: parameter dtype (``torch.bfloat16`` for PULSE-7B on a GPU).
        device: where to build the model.
        vision_tower_path: a local CLIP directory (config, ``preprocessor_config.json``,
            safetensors weights), used instead of the one ``mm_vision_tower`` names. Its weights
            are used when ``unfreeze_mm_vision_tower`` is false or absent (LLaVA then ignores
            the checkpoint's tower weights) or when the checkpoint holds no tower weights.
        attn_implementation: ``sdpa`` (default), ``flash_attention_2`` (needs flash-attn) or
            ``eager``, for the language model and the CLIP tower alike.

    Returns:
        The model in eval mode and its processor.

    Raises:
        CheckpointError: missing files or shards, missing/unexpected weight keys (listed), shape
            mismatches.
        PulseConfigError: config values PULSE's code would not run this way.
        ValueError: an attention implementation that is unknown or not installed.
    """
    path = Path(path)
    started = time.perf_counter()
    config_dict, pulse_config, vision, files, tokenizer = check_checkpoint(path, vision_tower_path)
    tower_from_dir = not pulse_config.vision_tower_in_checkpoint
    model = build_pulse(config_dict, CLIPVisionConfig(**vision.config), dtype=dtype, device=device,
                        attn_implementation=attn_implementation)
    model.load_ignored_keys = load_weights(model, files, vision.weights_dir, tower_from_dir)
    model.eval()
    # PEFT records this as the adapter's base model.
    model.config._name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        # transformers' from_pretrained (LLaVA's loader) applies the checkpoint's own defaults.
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.bos_token_id is None:
        gen.bos_token_id = tokenizer.bos_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    model.load_seconds = time.perf_counter() - started
    processor = PulseProcessor(
        tokenizer, PulseImageProcessor(vision.preprocess, pulse_config.image_grid_pinpoints)
    )
    return model, processor

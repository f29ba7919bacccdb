"""What a PULSE checkpoint folder must hold, checked without reading a weight or importing
torch: the config, the CLIP tower's source, the safetensors files and the tokenizer.

A training or search driver calls :func:`check_checkpoint` before Ray starts, so that a broken
checkpoint is named at once. torch and transformers' model stack are not imported here: with
them the driver's checks took 5.3-5.7 s on a 2-core machine (0.6-0.7 s without), for a model
it never builds (``ecgvlm.model.pulse.load_pulse`` runs the same checks, then builds it). The
CLIP config is kept as CLIPVisionConfig's arguments, which ``load_pulse`` builds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecgvlm.model.config import PulseConfig
from ecgvlm.model.processor import ImagePreprocessConfig, LlamaSentencePieceTokenizer

# CLIP towers a PULSE config may name, by shape only: weights come from the checkpoint (LLaVA
# 1.6 and PULSE save their tuned tower, unfreeze_mm_vision_tower true) or from a local
# directory, never from a hub.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "num_channels": 3,
    },
}


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a complete PULSE model; lists what is wrong."""


@dataclass
class VisionTowerSource:
    """Where the CLIP tower's shape (and, if not in the checkpoint, weights) come from."""

    config: dict[str, Any]  # CLIPVisionConfig's arguments (transformers is not imported here)
    preprocess: ImagePreprocessConfig
    weights_dir: Path | None


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse a JSON file, naming it in the error."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} not found: {path}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON: {path}: {e}") from e


def _vision_from_dir(directory: Path) -> VisionTowerSource:
    data = read_json(directory / "config.json", "CLIP config")
    if "vision_config" in data:  # a full CLIPModel directory
        data = data["vision_config"]
    data = {k: v for k, v in data.items() if k not in ("model_type", "architectures")}
    pre_file = directory / "preprocessor_config.json"
    try:
        preprocess = (
            ImagePreprocessConfig.from_file(pre_file)
            if pre_file.is_file()
            else ImagePreprocessConfig(data.get("image_size", 336), data.get("image_size", 336))
        )
    except ValueError as e:
        raise CheckpointError(f"preprocessor_config.json: {e}") from e
    has_weights = any(directory.glob("*.safetensors"))
    return VisionTowerSource(data, preprocess, directory if has_weights else None)


def resolve_vision_tower(
    checkpoint_dir: Path, name: str, vision_tower_path: str | Path | None
) -> VisionTowerSource:
    """Find the CLIP tower's config: explicit path, a directory named by the config, or a known
    hub name (shape only)."""
    if vision_tower_path is not None:
        path = Path(vision_tower_path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"vision_tower_path {path} holds no CLIP config.json")
        return _vision_from_dir(path)
    for candidate in (checkpoint_dir / name, Path(name)):
        if (candidate / "config.json").is_file():
            return _vision_from_dir(candidate)
    if name in KNOWN_VISION_TOWERS:
        spec = KNOWN_VISION_TOWERS[name]
        size = spec["image_size"]
        return VisionTowerSource(dict(spec), ImagePreprocessConfig(size, size), None)
    raise CheckpointError(
        f"mm_vision_tower {name!r} is neither a directory (relative to {checkpoint_dir} or "
        f"absolute) nor a known tower ({', '.join(KNOWN_VISION_TOWERS)}); pass vision_tower_path"
    )


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Map every weight key to its safetensors file, checking that all shards exist."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = read_json(index_file, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file} has no weight_map")
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{directory} lacks {len(missing)} shard(s) named in {index_file.name}: "
                f"{', '.join(missing)}"
            )
        return {k: directory / f for k, f in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="numpy") as f:
            return {k: single for k in f.keys()}
    if any(directory.glob("*.bin")):
        raise CheckpointError(
            f"{directory} holds PyTorch .bin weights; only safetensors are loaded (convert them)"
        )
    raise CheckpointError(f"{directory} has no model.safetensors(.index.json)")


def check_checkpoint(
    path: str | Path, vision_tower_path: str | Path | None = None
) -> tuple[dict[str, Any], PulseConfig, VisionTowerSource, dict[str, Path], Any]:
    """Everything :func:`load_pulse` checks before it builds the model, without reading a
    weight: the config, the CLIP tower's source, the safetensors files (every shard the index
    names exists; a single file's header and keys are read) and the tokenizer against
    ``vocab_size``. A training job calls it on its driver, so a broken
    checkpoint is named once, before any worker starts.

    Returns:
        (config.json as a dict, the PulseConfig, the tower's source, weight key -> shard
        file, the tokenizer).

    Raises:
        CheckpointError: naming the missing or inconsistent file.
        PulseConfigError: config values PULSE's code would not run this way.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config_dict = read_json(path / "config.json", "config.json")
    pulse_config = PulseConfig.from_dict(config_dict)
    vision = resolve_vision_tower(path, pulse_config.vision_tower, vision_tower_path)
    if not pulse_config.vision_tower_in_checkpoint and vision.weights_dir is None:
        where = vision_tower_path if vision_tower_path is not None else pulse_config.vision_tower
        raise CheckpointError(
            f"unfreeze_mm_vision_tower is {config_dict.get('unfreeze_mm_vision_tower')!r}, so "
            f"LLaVA takes the CLIP tower's weights from mm_vision_tower, not the checkpoint, "
            f"but {where!r} is no local directory with safetensors weights; pass "
            f"vision_tower_path to a local CLIP directory"
        )
    files = checkpoint_files(path)
    try:
        tokenizer = LlamaSentencePieceTokenizer(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    vocab = int(config_dict.get("vocab_size", 32000))
    if len(tokenizer) != vocab:
        # LLaVA would resize the embeddings to the tokenizer, adding random rows.
        raise CheckpointError(
            f"tokenizer.model has {len(tokenizer)} pieces but vocab_size is {vocab}"
        )
    return config_dict, pulse_config, vision, files, tokenizer


def check_model_dir(model_dir: str) -> None:
    """Raise CheckpointError naming ``model_dir`` when it holds no usable PULSE checkpoint.

    A training driver and ``ecgvlm serve`` call it before Ray starts: otherwise the workers or
    the model replica find out only once Ray and they have started (44 s for a training run
    here, a traceback from each). A local folder gets every check the loader makes before
    reading a weight (:func:`check_checkpoint`: config, shards, tokenizer); in an object store
    only ``config.json`` is looked for (the driver does not copy a model it will not load).
    """
    from ecgvlm import storage

    if not storage.is_file(storage.join(model_dir, "config.json")):
        raise CheckpointError(f"model_dir {model_dir}: no config.json there; it must be a "
                              "PULSE checkpoint folder (config.json, model.safetensors)")
    local = storage.local_path(model_dir)
    if local is None:
        return
    try:
        check_checkpoint(local)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, PulseConfigError, no tokenizer
        raise CheckpointError(f"model_dir {model_dir}: {e}") from e

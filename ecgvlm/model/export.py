"""Write a PULSE model back out: in its own LLaVA layout, or as transformers' LlavaNext.

``save_pulse_checkpoint`` writes the LLaVA layout PULSE ships in (use it after
:func:`ecgvlm.model.lora.merge_lora` to publish a merged model that LLaVA's code and
``load_pulse`` both read).

``export_llava_next`` converts to ``LlavaNextForConditionalGeneration`` only where that is
exact: ``mm_patch_merge_type: spatial_unpad``. transformers' LlavaNext always stitches the
tiles into one grid, crops the padding and appends ``image_newline`` after every row; PULSE's
``flat`` merge lays the overview tile and then each tile's patches out in raster order with
no newline vectors (and ``spatial`` stitches without cropping or newlines), so a LlavaNext
model would show the language model a different sequence from the one it was trained on.
One difference remains, in unpadding: LLaVA keeps ``int(x)`` rows (or columns) of the
stitched feature grid, where ``x = height * grid_width / width`` (or the transposed
expression), and transformers' LlavaNext keeps ``int(round(x, 7))``. When ``x`` falls just
below an integer in floating point the two keep a different number of rows, so for those image
sizes the exported model sees one more row or column (and its processor counts that many more
``<image>`` tokens) than PULSE was run with. :func:`llava_next_unpad_differs` says whether an
image size is one of them (at PULSE-7B's shapes, 88x55 and 176x110 px are); check images with
it before using an exported model, or use ``load_pulse``, which is exact for every size.
Conversion details: LlavaNext pinpoints are (height, width) where LLaVA's are (width, height)
(swapped, order kept so ties break the same way); ``<image>`` becomes a real token at
``vocab_size`` (embedding and lm_head rows set to the mean row); ``image_sizes`` are (height,
width).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ecgvlm.model.processor import anyres_grid_shape
from ecgvlm.model.pulse import VISION_PREFIX, PulseModel, checkpoint_state_dict
from ecgvlm.model.tiny import save_sharded

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
PULSE_COPY_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
SHARD_BYTES = 5 * 1024**3


class ExportError(ValueError):
    """A model that cannot be exported exactly in the requested format; the message says why."""


def _shard_count(tensors: dict[str, torch.Tensor]) -> int:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return max(1, -(-total // SHARD_BYTES))


def save_pulse_checkpoint(model: PulseModel, out_dir: str | Path, source_dir: str | Path) -> Path:
    """Write ``model`` in PULSE's LLaVA layout, config and tokenizer copied from ``source_dir``.

    Args:
        model: a PulseModel (merge LoRA adapters first with ``merge_lora``).
        out_dir: new checkpoint directory.
        source_dir: the checkpoint the model was loaded from (config, tokenizer, vision config).
    """
    if hasattr(model, "peft_config"):
        raise ExportError("model still carries LoRA adapters; merge_lora(model) first")
    out, src = Path(out_dir), Path(source_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in PULSE_COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    tower = src / model.pulse_config.vision_tower
    if tower.is_dir() and tower.resolve().is_relative_to(src.resolve()):
        shutil.copytree(tower, out / model.pulse_config.vision_tower, dirs_exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in checkpoint_state_dict(model).items()}
    save_sharded(tensors, out, shards=_shard_count(tensors))
    return out


def llava_next_state_dict(model: PulseModel) -> dict[str, torch.Tensor]:
    """PULSE weights under transformers 5 LlavaNext names, with one ``<image>`` row added."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        if key.startswith(VISION_PREFIX):
            new = "model.vision_tower." + key[len(VISION_PREFIX) :]
        elif key.startswith("model.mm_projector."):
            index, param = key[len("model.mm_projector.") :].split(".", 1)
            new = f"model.multi_modal_projector.linear_{int(index) // 2 + 1}.{param}"
        elif key == "model.image_newline":
            new = key
        elif key.startswith("model."):
            new = "model.language_model." + key[len("model.") :]
        else:
            new = key
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = torch.cat((value, value.mean(0, keepdim=True)))
        out[new] = value.contiguous()
    return out


def llava_next_unpad_differs(
    image_size: tuple[int, int],
    pinpoints: Sequence[tuple[int, int]],
    tile_px: int,
    patches_per_side: int,
) -> bool:
    """Whether transformers' LlavaNext unpads an image of this size differently from LLaVA.

    Args:
        image_size: (width, height) in pixels, PIL order.
        pinpoints: ``image_grid_pinpoints`` as (width, height).
        tile_px: the CLIP tile side (336 for PULSE-7B).
        patches_per_side: CLIP patches per tile side (24 for PULSE-7B).

    Returns:
        True when the exported model would keep a different number of feature rows or columns
        than LLaVA (and ``load_pulse``) for this image.
    """
    width, height = int(image_size[0]), int(image_size[1])
    across, down = anyres_grid_shape((width, height), pinpoints, tile_px)
    cur_w, cur_h = across * patches_per_side, down * patches_per_side
    if width / height > cur_w / cur_h:
        kept, current = height * (cur_w / width), cur_h
    else:
        kept, current = width * (cur_h / height), cur_w
    return (current - int(kept)) // 2 != (current - int(round(kept, 7))) // 2


def export_llava_next(model: PulseModel, processor: Any, out_dir: str | Path) -> Path:
    """Write ``model`` as a transformers ``LlavaNextForConditionalGeneration`` directory.

    The export computes what ``model`` computes for every image size except those for which
    :func:`llava_next_unpad_differs` is true (see the module docstring).

    Raises:
        ExportError: for ``flat`` or ``spatial`` merges (not representable exactly), a
            projector other than ``mlp2x_gelu``, or a model still carrying LoRA adapters.
    """
    from transformers import LlavaNextConfig

    cfg = model.pulse_config
    if hasattr(model, "peft_config"):
        raise ExportError("model still carries LoRA adapters; merge_lora(model) first")
    if cfg.patch_merge_type != "spatial_unpad":
        raise ExportError(
            f"cannot export mm_patch_merge_type {cfg.patch_merge_type!r} to LlavaNext exactly: "
            "LlavaNext always stitches tiles into one grid, crops the padding and appends an "
            "image_newline vector after every row (LLaVA's 'spatial_unpad'), while this model "
            "was trained on "
            + (
                "the overview tile then each tile's patches in raster order with no newline "
                "vectors ('flat', PULSE's layout)"
                if cfg.patch_merge_type == "flat"
                else "stitched tiles without cropping or newline vectors ('spatial')"
            )
            + "; the language model would see a different sequence. Use load_pulse instead."
        )
    if cfg.projector_type != "mlp2x_gelu":
        raise ExportError(
            f"LlavaNext's projector is mlp2x_gelu; this model has {cfg.projector_type!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(model.config.vocab_size)
    text = model.config.to_dict()
    text.update(vocab_size=vocab + 1, model_type="llama")
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    tower_cfg = model.model.vision_tower.vision_tower.config.to_dict()
    llava_cfg = LlavaNextConfig(
        vision_config=tower_cfg,
        text_config=text,
        image_grid_pinpoints=[[h, w] for w, h in cfg.image_grid_pinpoints],
        image_token_index=vocab,
        vision_feature_layer=cfg.vision_select_layer,
        vision_feature_select_strategy="default"
        if cfg.vision_select_feature == "patch"
        else "full",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    llava_cfg.architectures = ["LlavaNextForConditionalGeneration"]
    llava_cfg.save_pretrained(str(out))
    tensors = llava_next_state_dict(model)
    save_sharded(tensors, out, shards=_shard_count(tensors))
    patch_px = int(model.model.vision_tower.vision_tower.config.patch_size)
    _write_llava_next_processor(processor, cfg, vocab, patch_px, out)
    return out


def _write_llava_next_processor(
    processor: Any, cfg: Any, vocab: int, patch_px: int, out: Path
) -> None:
    tok = processor.tokenizer
    pre = processor.image_processor.config
    source = Path(tok.source_dir)
    shutil.copy2(source / "tokenizer.model", out / "tokenizer.model")
    tok_cfg = json.loads((source / "tokenizer_config.json").read_text())
    tok_cfg.setdefault("added_tokens_decoder", {})[str(vocab)] = {
        "content": "<image>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    tok_cfg.update(padding_side="left", processor_class="LlavaNextProcessor")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if (source / "special_tokens_map.json").is_file():
        shutil.copy2(source / "special_tokens_map.json", out / "special_tokens_map.json")
    image_cfg = pre.to_transformers()
    image_cfg.update(
        image_processor_type="LlavaNextImageProcessor",
        image_grid_pinpoints=[[h, w] for w, h in cfg.image_grid_pinpoints],
        do_pad=True,
    )
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2) + "\n")
    proc_cfg = {
        "processor_class": "LlavaNextProcessor",
        "image_token": "<image>",
        "patch_size": patch_px,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    (out / "processor_config.json").write_text(json.dumps(proc_cfg, indent=2) + "\n")

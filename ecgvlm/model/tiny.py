"""Tiny random PULSE checkpoints in exactly PULSE-7B's on-disk layout, built offline.

The directory holds what PULSE-7B's does: ``config.json`` (``llava_llama`` with the real
``mm_*`` keys), two safetensors shards with ``model.safetensors.index.json`` and LLaVA's key
names, a sentencepiece ``tokenizer.model`` (trained here, in-process, on a small text with the
llava_v1 template words, ECG vocabulary and the letters A-H) with Vicuna's
``tokenizer_config.json`` and ``special_tokens_map.json``.

What is smaller than PULSE-7B, and why PULSE's config semantics still hold:

- the CLIP tower sees 56 px tiles (patch 14, so 4x4 patches per tile; PULSE: 336 px, 24x24)
  and its ``image_grid_pinpoints`` are PULSE's divided by 6 (``[[56, 112], [112, 56], [112,
  112], [168, 56], [56, 168]]``), so the same grids (2x1, 1x2, 2x2, 3x1, 1x3 tiles) are chosen
  for the same image shapes;
- 3 CLIP layers (select layer -2 is still the penultimate), width 32; Llama 2 layers, width 64;
- the CLIP shape lives in ``vision_tower/`` inside the checkpoint (``config.json`` +
  ``preprocessor_config.json``; ``mm_vision_tower: "vision_tower"``), because no hub name
  describes it; its weights are in the shards, as PULSE-7B's are. With
  ``tower_in_checkpoint=False`` the config says ``unfreeze_mm_vision_tower: false`` and
  ``vision_tower/model.safetensors`` holds a standalone tower drawn from ``seed + 1``, different
  from the shards' copy, so a loader that used the wrong one is caught.

Weights are drawn from ``numpy.random.default_rng(seed)`` key by key in sorted order, scaled
so activations stay of order one (logits then differ enough between inputs for parity tests
to mean something), so the same seed gives byte-identical shards on any machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecgvlm.model.config import PULSE_7B_CONFIG
from ecgvlm.model.processor import ImagePreprocessConfig

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
TINY_VOCAB_SIZE = 320
#: The language model's width: what tells a tiny checkpoint from a real one (PULSE-7B: 4096).
TINY_HIDDEN_SIZE = 64
SHARDS = 2

# Text the tiny tokenizer learns from: the llava_v1 template, ECG findings, MCQ letters.
TOKENIZER_TEXT = """\
A chat between a curious human and an artificial intelligence assistant. The assistant gives \
helpful, detailed, and polite answers to the human's questions.
USER: <image>
What is the most likely diagnosis from this ECG? ASSISTANT: The answer is B.
Options: A. Normal sinus rhythm B. Atrial fibrillation C. First degree AV block \
D. Left bundle branch block E. Right bundle branch block F. Premature atrial contraction \
G. Premature ventricular contraction H. ST-segment depression
The ECG shows an irregularly irregular rhythm without P waves, consistent with atrial \
fibrillation. Heart rate 72 bpm, PR interval 200 ms, QRS duration 120 ms, QT 400 ms.
Leads I, II, III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V6 show ST elevation and T wave \
inversion. Sinus bradycardia, sinus tachycardia, left axis deviation, ventricular \
hypertrophy, myocardial infarction, ischemia, paced rhythm, low voltage QRS.
Answer: A B C D E F G H
"""


def _train_tokenizer(out_dir: Path) -> int:
    """Train a Llama-style BPE sentencepiece model; returns its vocabulary size.

    Trained from an in-memory iterator into memory, so no temporary path ends up in the model
    file and the same text gives the same bytes.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(TOKENIZER_TEXT.splitlines() * 4),
        model_writer=model,
        model_type="bpe",
        vocab_size=TINY_VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    return TINY_VOCAB_SIZE


def _special(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def _write_tokenizer_files(out_dir: Path) -> None:
    """Vicuna/LLaVA-1.6's tokenizer_config.json and special_tokens_map.json."""
    decoder = {
        str(i): {**_special(tok), "special": True} for i, tok in enumerate(("<unk>", "<s>", "</s>"))
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<unk>",
        "padding_side": "right",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special = {
        "bos_token": _special("<s>"),
        "eos_token": _special("</s>"),
        "pad_token": "<unk>",
        "unk_token": _special("<unk>"),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def tiny_config(vocab_size: int, merge: str) -> dict[str, Any]:
    """config.json of the tiny model: PULSE-7B's keys and values, sizes made tiny."""
    return {
        **PULSE_7B_CONFIG,
        "hidden_size": TINY_HIDDEN_SIZE,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "image_grid_pinpoints": TINY_PINPOINTS,
        "mm_hidden_size": TINY_VISION["hidden_size"],
        "mm_patch_merge_type": merge,
        "mm_vision_tower": "vision_tower",
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
    }


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights of order-one activations, independent of any library's initialiser."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith("bias"):
            arr = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # norms, image_newline, class embedding
            arr = (
                1.0 + 0.1 * rng.standard_normal(shape)
                if "norm" in key
                else rng.standard_normal(shape)
            )
        elif "embed" in key and "patch_embedding" not in key:
            arr = rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            arr = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return out


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int = SHARDS) -> None:
    """Write LLaVA/HF-style shards ``model-0000i-of-0000n.safetensors`` plus the index."""
    from safetensors.torch import save_file

    keys = sorted(tensors)
    per = -(-len(keys) // shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out_dir / name), metadata={"format": "pt"})
        for k, t in part.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_tiny_target(out: Path) -> None:
    """Raise ValueError when ``out`` holds anything but a tiny checkpoint: writing one there
    replaces ``config.json``, the tokenizer and the weights, and a real model's (a typo in
    ``ecgvlm model make-tiny /models/PULSE-7B``) would be lost. An empty or missing folder,
    or a tiny checkpoint written before (the README's command run again), is fine."""
    if not out.is_dir():
        return  # missing: made; a file: mkdir says so
    names = sorted(entry.name for entry in out.iterdir())
    if not names:
        return
    try:
        hidden_size = json.loads((out / "config.json").read_text()).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        hidden_size = None
    if hidden_size != TINY_HIDDEN_SIZE:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ValueError(f"{out} already holds files ({shown}) and no tiny checkpoint: a tiny "
                         "one written there would replace its config.json, tokenizer and "
                         "weights; give a new or empty folder")


def make_tiny_pulse(
    out_dir: str | Path, seed: int = 0, merge: str = "flat", tower_in_checkpoint: bool = True
) -> Path:
    """Write a tiny random PULSE checkpoint (a few MB) in PULSE-7B's layout.

    Args:
        out_dir: directory to create; it may exist empty or hold a tiny checkpoint, which is
            overwritten (anything else is refused: :func:`check_tiny_target`).
        seed: the same seed gives byte-identical weights and tokenizer.
        merge: ``mm_patch_merge_type``: ``flat`` (PULSE) or ``spatial_unpad`` (LLaVA-1.6).
        tower_in_checkpoint: ``unfreeze_mm_vision_tower`` (PULSE: true). False also writes
            standalone tower weights (seed + 1) into ``vision_tower/``.

    Returns:
        ``out_dir`` as a Path, ready for :func:`ecgvlm.model.load_pulse`.
    """
    from transformers import CLIPVisionConfig

    from ecgvlm.config import check_choice
    from ecgvlm.model.pulse import build_pulse, checkpoint_state_dict

    check_choice("merge", merge, ("flat", "spatial", "spatial_unpad"))
    out = Path(out_dir)
    check_tiny_target(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(out)
    _write_tokenizer_files(out)
    config = {**tiny_config(vocab, merge), "unfreeze_mm_vision_tower": tower_in_checkpoint}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    vision_dir = out / "vision_tower"
    vision_dir.mkdir(exist_ok=True)
    vision_cfg = {"model_type": "clip_vision_model", **TINY_VISION}
    (vision_dir / "config.json").write_text(json.dumps(vision_cfg, indent=2) + "\n")
    size = TINY_VISION["image_size"]
    preprocess = ImagePreprocessConfig(shortest_edge=size, crop_size=size).to_transformers()
    (vision_dir / "preprocessor_config.json").write_text(json.dumps(preprocess, indent=2) + "\n")
    model = build_pulse(config, CLIPVisionConfig(**TINY_VISION), dtype=torch.float32, device="meta")
    shapes = {k: tuple(v.shape) for k, v in checkpoint_state_dict(model).items()}
    save_sharded(random_weights(shapes, seed), out)
    if not tower_in_checkpoint:
        from safetensors.torch import save_file

        from ecgvlm.model.pulse import VISION_PREFIX

        tower = {
            k[len(VISION_PREFIX) :]: v for k, v in shapes.items() if k.startswith(VISION_PREFIX)
        }
        save_file(
            random_weights(tower, seed + 1),
            str(vision_dir / "model.safetensors"),
            metadata={"format": "pt"},
        )
    return out


def checkpoint_digest(directory: str | Path) -> str:
    """sha256 over what decides a tiny build's outputs, to tell two builds apart.

    Covers ``tokenizer.model``, ``config.json``, the files in ``vision_tower/`` (CLIP config,
    preprocessor config, standalone weights when written) and every shard's tensors by key.
    """
    from safetensors import safe_open

    directory = Path(directory)
    digest = hashlib.sha256((directory / "tokenizer.model").read_bytes())
    digest.update((directory / "config.json").read_bytes())
    for extra in sorted((directory / "vision_tower").glob("*")):
        digest.update(extra.name.encode())
        digest.update(extra.read_bytes())
    for shard in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="np") as f:
            for key in sorted(f.keys()):
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(f.get_tensor(key)).tobytes())
    return digest.hexdigest()

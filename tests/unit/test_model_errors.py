"""Bad input: broken checkpoints, unsupported configs, wrong images and prompts: clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ecgvlm.model import (
    CheckpointError,
    ImageInputError,
    PromptError,
    PulseConfigError,
    load_pulse,
)
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401

SHARD1 = "model-00001-of-00002.safetensors"


@pytest.fixture()
def ckpt(tiny_pulse_dir, tmp_path):
    return shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def processor(tiny_pulse_dir):
    return load_pulse(tiny_pulse_dir)[1]


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_shard(path, fn):
    tensors = load_file(str(path / SHARD1))
    fn(tensors)
    save_file(tensors, str(path / SHARD1), metadata={"format": "pt"})


def test_missing_shard_is_named(ckpt):
    (ckpt / SHARD1).unlink()
    with pytest.raises(CheckpointError, match=f"lacks 1 shard.*{SHARD1}"):
        load_pulse(ckpt)


def test_missing_and_unexpected_keys_are_listed(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    first = min(k for k, f in index["weight_map"].items() if f == SHARD1)
    del index["weight_map"][first]
    index["weight_map"]["model.extra_head.weight"] = SHARD1
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _edit_shard(ckpt, lambda t: t.update({"model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError) as err:
        load_pulse(ckpt)
    message = str(err.value)
    assert f"missing 1 key(s): {first}" in message
    assert "unexpected 1 key(s): model.extra_head.weight" in message


def test_wrong_shape_is_named(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = min(k for k, f in index["weight_map"].items() if f == SHARD1)
    _edit_shard(ckpt, lambda t: t.update({key: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=f"{key}.*shape \\(3, 3\\)"):
        load_pulse(ckpt)


def test_unused_image_newline_in_flat_checkpoint_is_ignored(ckpt):
    # PULSE kept LLaVA-1.6's image_newline in its weights although it uses the flat merge.
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.image_newline"] = SHARD1
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    _edit_shard(ckpt, lambda t: t.update({"model.image_newline": torch.ones(64)}))
    model, _ = load_pulse(ckpt)
    assert model.load_ignored_keys == ["model.image_newline"]


def test_missing_vision_weights_point_to_vision_tower_path(ckpt, tmp_path):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    tower = {k for k in index["weight_map"] if k.startswith("model.vision_tower.")}
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if k not in tower}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="vision_tower_path"):
        load_pulse(ckpt)
    # A local CLIP directory supplies the tower: config plus vision_model.* weights.
    clip = tmp_path / "clip"
    shutil.copytree(ckpt / "vision_tower", clip)
    weights = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        for k, v in load_file(str(shard)).items():
            if k in tower:
                weights[k.removeprefix("model.vision_tower.vision_tower.")] = v
    save_file(weights, str(clip / "model.safetensors"))
    model, _ = load_pulse(ckpt, vision_tower_path=clip)
    got = model.model.vision_tower.vision_tower.embeddings.class_embedding
    assert torch.equal(got, weights["vision_model.embeddings.class_embedding"])


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"model_type": "llava_mistral"}, "model_type must be one of 'llava_llama'"),
        ({"mm_patch_merge_type": "spatial_pad"}, "mm_patch_merge_type must be one of"),
        ({"image_aspect_ratio": "pad"}, "image_aspect_ratio must be one of 'anyres'"),
        ({"mm_projector_type": "qformer"}, "mm_projector_type must be"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature must be one of"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end must be false"),
        ({"image_grid_pinpoints": [[60, 112]]}, "not a multiple of the CLIP image size 56"),
        ({"mm_hidden_size": 48}, "mm_hidden_size 48 does not match"),
        ({"mm_vision_select_layer": -9}, "mm_vision_select_layer must index"),
        ({"vocab_size": 321}, "tokenizer.model has 320 pieces but vocab_size is 321"),
        ({"mm_vision_tower": "no/such-tower"}, "pass vision_tower_path"),
    ],
)
def test_unsupported_config_values(ckpt, changes, match):
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=match) as err:
        load_pulse(ckpt)
    assert isinstance(err.value, (PulseConfigError, CheckpointError))


def test_missing_files(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_pulse(tmp_path / "nowhere")
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_pulse(ckpt)
    for f in ckpt.glob("model*"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_pulse(ckpt)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (Image.new("I;16", (100, 100)), "mode 'I;16'"),
        (Image.new("F", (100, 100)), "mode 'F'"),
        (Image.new("RGB", (8, 100)), "8x100 px; each side must be within"),
        (Image.new("RGB", (20000, 100)), "each side must be within"),
        (Image.new("RGB", (3300, 100)), "aspect ratio above 32"),
        ("not an image", "must be a PIL.Image.Image, got str"),
    ],
)
def test_bad_images(processor, image, match):
    with pytest.raises(ImageInputError, match=match):
        processor([llava_v1("Q")], [image])


def test_convertible_modes_match_rgb(processor):
    rgb = noise_image(120, 90, 0).quantize(64).convert("RGB")
    palette = rgb.quantize(64)  # the renderer writes palette PNGs
    a = processor([llava_v1("Q")], [rgb])["pixel_values"]
    b = processor([llava_v1("Q")], [palette.convert("RGB")])["pixel_values"]
    c = processor([llava_v1("Q")], [palette])["pixel_values"]
    assert torch.equal(a, b) and torch.equal(b, c)
    grey = processor([llava_v1("Q")], [Image.new("L", (64, 64), 128)])["pixel_values"]
    # A small square image is upscaled onto the 2x2 canvas: overview + 4 tiles.
    assert grey.shape[1] == 5


@pytest.mark.parametrize(
    ("prompts", "n_images", "match"),
    [
        (["no placeholder"], 1, "exactly one '<image>' placeholder, has 0"),
        (["<image> and <image>"], 1, "has 2"),
        ([llava_v1("a"), llava_v1("b")], 1, "one image per prompt"),
        ([], 0, "at least one"),
    ],
)
def test_bad_prompts(processor, prompts, n_images, match):
    with pytest.raises(PromptError, match=match):
        processor(prompts, [noise_image(64, 64, 0)] * n_images)

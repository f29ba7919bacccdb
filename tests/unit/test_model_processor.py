"""Anyres tiling, feature counts and tokenisation, against values worked out from LLaVA's code.

The golden-logit parity test covers the tiny model end to end; these pin the PULSE-7B shapes
(336 px CLIP tiles, 24x24 patches, PULSE's pinpoints) without building a 7B model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig

from ecgvlm.model.checkpoint import KNOWN_VISION_TOWERS
from ecgvlm.model.config import PULSE_7B_CONFIG, PulseConfig
from ecgvlm.model.processor import (
    IMAGE_TOKEN_INDEX,
    ImagePreprocessConfig,
    PulseImageProcessor,
    select_best_resolution,
)
from ecgvlm.model.pulse import build_pulse
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401

PINPOINTS = [tuple(p) for p in PULSE_7B_CONFIG["image_grid_pinpoints"]]


@pytest.mark.parametrize(
    ("size", "best"),
    [
        # 2200x1700 (an ECG-Image-Kit printout): 672x672 keeps 672x519 pixels, the most.
        ((2200, 1700), (672, 672)),
        # A 3:1 strip: 1008x336 keeps 1008x336; 672x672 only 672x224.
        ((1500, 500), (1008, 336)),
        # Square images tie between 336x672 and 672x336 at 336x336 kept; 672x672 keeps all
        # of a 600x600 image (upscaled effective area is capped at the original's).
        ((600, 600), (672, 672)),
        ((300, 300), (336, 672)),  # all canvases keep 300x300; the least wasted comes first
        ((500, 1400), (336, 1008)),
    ],
)
def test_select_best_resolution_pulse_pinpoints(size, best):
    assert select_best_resolution(size, PINPOINTS) == best


@pytest.fixture(scope="module")
def pulse_7b_shapes():
    """PULSE-7B's exact module shapes on the meta device (no memory, no weights)."""
    vision = CLIPVisionConfig(**KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"])
    flat = build_pulse(dict(PULSE_7B_CONFIG), vision, dtype=torch.bfloat16, device="meta")
    unpad = build_pulse(
        {**PULSE_7B_CONFIG, "mm_patch_merge_type": "spatial_unpad"}, vision, device="meta"
    )
    return flat, unpad


def test_pulse_7b_shapes(pulse_7b_shapes):
    flat, unpad = pulse_7b_shapes
    n_params = sum(p.numel() for p in flat.parameters())
    # Vicuna-7B (6.74e9) + CLIP ViT-L/14-336 vision (3.04e8) + projector (2.1e7).
    assert 7.0e9 < n_params < 7.1e9
    assert flat.model.mm_projector[0].weight.shape == (4096, 1024)
    assert flat.model.mm_projector[2].weight.shape == (4096, 4096)
    assert flat.model.vision_tower.num_patches_per_side == 24
    assert not hasattr(flat.model, "image_newline") and unpad.model.image_newline.shape == (4096,)


@pytest.mark.parametrize(
    ("size", "flat", "unpad"),
    [
        # 2x2 grid: 5 tiles x 576. Unpad: 48x48 patch canvas, image height 1700*48/2200 = 37.09
        # -> 37 rows, padding (48-37)//2 = 5 off top and bottom -> 38 rows x (48 + newline).
        ((2200, 1700), 5 * 576, 576 + 38 * 49),
        # 3x1 grid: 4 tiles. 72x24 canvas exactly 3:1, nothing to crop: 24 x (72 + 1).
        ((1500, 500), 4 * 576, 576 + 24 * 73),
        # 1x2 grid: 3 tiles. Square image on a 24x48 (w x h) canvas: width 24, height 24 ->
        # pad (48-24)//2 = 12 each side -> 24 rows x (24 + 1).
        ((300, 300), 3 * 576, 576 + 24 * 25),
    ],
)
def test_pulse_7b_feature_counts(pulse_7b_shapes, size, flat, unpad):
    flat_model, unpad_model = pulse_7b_shapes
    assert flat_model.num_image_features(size) == flat
    assert unpad_model.num_image_features(size) == unpad


def test_pulse_7b_tiles_are_336_and_clip_normalised():
    proc = PulseImageProcessor(ImagePreprocessConfig(336, 336), PINPOINTS)
    image = noise_image(2200, 1700, 0)
    pixels = proc(image)
    assert pixels.shape == (5, 3, 336, 336)
    tiles = proc.tiles(image)
    assert [t.size for t in tiles] == [(336, 336)] * 5
    # The 2200x1700 image fills 672x519 of the 672x672 canvas, centred: black bars of
    # (672-520)//2 = 76 rows on top (ceil(1700*672/2200) = 520 rows of image).
    top_left = tiles[1]
    assert top_left.getpixel((100, 75)) == (0, 0, 0) and top_left.getpixel((100, 76)) != (0, 0, 0)
    black = (torch.zeros(3) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(pixels[1, :, 0, 0], black)


@pytest.mark.parametrize(
    "config",
    [
        ImagePreprocessConfig(336, 336),
        ImagePreprocessConfig(336, 336, do_normalize=False),
        ImagePreprocessConfig(336, 336, do_rescale=False),
        ImagePreprocessConfig(336, 336, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                              rescale_factor=1 / 127.5),
        ImagePreprocessConfig(64, 56, resample=2),  # CLIP's own resize, then a centre crop
    ],
)
def test_tiles_by_table_are_the_arithmetic_bit_for_bit(config):
    import numpy as np

    proc = PulseImageProcessor(config, [(config.crop_size * 2, config.crop_size)])
    image = noise_image(300, 120, seed=7)
    pixels = proc(image)
    for tile, got in zip(proc.tiles(image), pixels):
        if min(tile.size) != config.shortest_edge:
            tile = tile.resize((config.shortest_edge * tile.size[0] // tile.size[1],
                                config.shortest_edge), config.resample)
        left = (tile.size[0] - config.crop_size) // 2
        top = (tile.size[1] - config.crop_size) // 2
        tile = tile.crop((left, top, left + config.crop_size, top + config.crop_size))
        arithmetic = proc.normalise(np.asarray(tile, dtype=np.uint8)).transpose(2, 0, 1)
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(arithmetic)))
    # Every 8-bit value of every channel, not only those the noise image holds.
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(16, 16, 3)
    table = proc._value_table[np.arange(3), every].transpose(2, 0, 1)
    assert np.array_equal(table, proc.normalise(every).transpose(2, 0, 1))


def test_tokenizer_image_token_layout(tiny_pulse_dir):
    from ecgvlm.model import load_pulse

    _, processor = load_pulse(tiny_pulse_dir)
    tok = processor.tokenizer
    ids = tok.tokenize_with_image(llava_v1("Q"))
    at = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # The text after <image> is tokenised on its own, so it starts with a word boundary as
    # LLaVA's chunked tokenisation does (Llama's 29871 before "\n" in the real vocabulary).
    assert ids[at + 1 :] == tok.encode("\nQ ASSISTANT:")[1:]
    assert tok._sp.IdToPiece(ids[at + 1]) == "\u2581"
    assert tok.encode("</s>", add_special_tokens=False) == [tok.eos_token_id]
    # transformers-style call and batch_decode, as training code uses them.
    called = tok(["Q", "A longer answer</s>"])
    assert called["input_ids"] == [tok.encode("Q"), tok.encode("A longer answer</s>")]
    assert called["attention_mask"][0] == [1] * len(called["input_ids"][0])
    assert tok.batch_decode(called["input_ids"]) == ["Q", "A longer answer"]
    # Left padding: the shorter prompt gets pad ids and zero mask on the left.
    batch = processor([llava_v1("Q"), llava_v1("A longer question")], [noise_image(64, 64, 0)] * 2)
    first = batch["attention_mask"][0]
    assert first[0] == 0 and first[-1] == 1 and batch["input_ids"][0, 0] == tok.pad_token_id
    assert PulseConfig.from_dict(PULSE_7B_CONFIG).patch_merge_type == "flat"


def test_pulse_7b_lora_trainable_count():
    from ecgvlm.model.lora import attach_lora, parameter_counts

    vision = CLIPVisionConfig(**KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"])
    model = build_pulse(dict(PULSE_7B_CONFIG), vision, device="meta")
    trainable, total = parameter_counts(attach_lora(model))
    print(f"PULSE-7B LoRA: {trainable} trainable of {total}")
    assert trainable == 32 * 4 * (4 * 4096 + 4096 * 4)  # 4,194,304

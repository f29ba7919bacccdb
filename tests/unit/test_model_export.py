"""Export: LlavaNext only where exact (spatial_unpad); PULSE layout round trip after merging."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from ecgvlm.model import IMAGE_TOKEN_INDEX, load_pulse, make_tiny_pulse
from ecgvlm.model.export import ExportError, export_llava_next, save_pulse_checkpoint
from ecgvlm.model.lora import attach_lora, merge_lora
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def unpad(tmp_path_factory):
    path = make_tiny_pulse(tmp_path_factory.mktemp("unpad"), seed=3, merge="spatial_unpad")
    return load_pulse(path)


def test_llava_next_export_has_identical_logits(unpad, tmp_path):
    model, processor = unpad
    out = export_llava_next(model, processor, tmp_path / "hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    image_id = model.config.vocab_size
    # Wide, tall, near square and a square image (which exercises the pinpoint tie-break).
    for i, (w, h) in enumerate(((300, 120), (90, 200), (220, 170), (150, 150))):
        image = noise_image(w, h, i)
        batch = processor([llava_v1("Which leads show ST elevation?")], [image])
        ids = batch["input_ids"][0].tolist()
        at = ids.index(IMAGE_TOKEN_INDEX)
        n = model.num_image_features(image.size)
        hf_ids = torch.tensor([ids[:at] + [image_id] * n + ids[at + 1 :]])
        with torch.no_grad():
            ours = model(**batch).logits
            theirs = hf(
                input_ids=hf_ids,
                pixel_values=batch["pixel_values"],
                image_sizes=batch["image_sizes"].flip(-1),  # LlavaNext wants (height, width)
            ).logits
        assert theirs.shape[:2] == ours.shape[:2]
        assert (theirs[..., :image_id] - ours).abs().max().item() <= 1e-5
    # transformers' own processor makes the same pixels from the exported config.
    hf_proc = AutoProcessor.from_pretrained(str(out))
    image = noise_image(300, 120, 0)
    theirs = hf_proc(images=[image], text=[llava_v1("Q")], return_tensors="pt")["pixel_values"]
    ours = processor([llava_v1("Q")], [image])["pixel_values"]
    torch.testing.assert_close(theirs[:, : ours.shape[1]], ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", ["flat", "spatial"])
def test_llava_next_export_refuses_inexact_merges(tmp_path, merge):
    model, processor = load_pulse(make_tiny_pulse(tmp_path / merge, merge=merge))
    with pytest.raises(ExportError, match="newline"):
        export_llava_next(model, processor, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_merged_lora_saved_in_pulse_layout_reloads(tiny_pulse_dir, tmp_path):
    model, processor = load_pulse(tiny_pulse_dir)
    peft_model = attach_lora(model, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    with pytest.raises(ExportError, match="merge_lora"):
        save_pulse_checkpoint(peft_model, tmp_path / "bad", tiny_pulse_dir)
    merged = merge_lora(peft_model)
    batch = processor([llava_v1("Rate?")], [noise_image(120, 80, 5)])
    out = save_pulse_checkpoint(merged, tmp_path / "merged", tiny_pulse_dir)
    again, _ = load_pulse(out)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, merged(**batch).logits, atol=0, rtol=0)


def _hf_unpadded_shape(grid: torch.Tensor, size: tuple[int, int]) -> tuple[int, ...]:
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    return tuple(unpad_image(grid, (size[1], size[0])).shape)


def test_unpad_difference_is_predicted_exactly(unpad):
    """llava_next_unpad_differs is true exactly where transformers' unpad keeps other rows."""
    from ecgvlm.model import llava_next_unpad_differs
    from ecgvlm.model.processor import anyres_grid_shape
    from ecgvlm.model.pulse import unpad_features

    model, _ = unpad
    pinpoints = model.pulse_config.image_grid_pinpoints
    side = model.model.vision_tower.num_patches_per_side
    differing = []
    for width in range(16, 200):
        for height in range(16, 200):
            size = (width, height)
            across, down = anyres_grid_shape(size, pinpoints, model.tile_px)
            grid = torch.empty(1, down * side, across * side)
            differs = tuple(unpad_features(grid, size).shape) != _hf_unpadded_shape(grid, size)
            assert llava_next_unpad_differs(size, pinpoints, model.tile_px, side) == differs, size
            differing.append(differs)
    print(f"{sum(differing)} of {len(differing)} sizes in [16, 200)^2 unpad differently")
    assert any(differing) and not all(differing)
    # PULSE-7B's shapes: the sizes named in docs/model.md.
    pulse_pins = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
    for size in ((88, 55), (176, 110)):
        assert llava_next_unpad_differs(size, pulse_pins, 336, 24)
    assert not llava_next_unpad_differs((2200, 1700), pulse_pins, 336, 24)


def test_exported_model_differs_on_predicted_size(unpad, tmp_path):
    from ecgvlm.model import llava_next_unpad_differs

    model, processor = unpad
    out = export_llava_next(model, processor, tmp_path / "hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    size = (47, 188)
    side = model.model.vision_tower.num_patches_per_side
    pins = model.pulse_config.image_grid_pinpoints
    assert llava_next_unpad_differs(size, pins, model.tile_px, side)
    batch = processor([llava_v1("Q")], [noise_image(*size, 9)])
    ids = batch["input_ids"][0].tolist()
    at = ids.index(IMAGE_TOKEN_INDEX)
    n = model.num_image_features(size)
    hf_ids = torch.tensor([ids[:at] + [model.config.vocab_size] * n + ids[at + 1 :]])
    with pytest.raises(ValueError, match=f"tokens: {n}, features: (?!{n}\\b)"):
        hf(
            input_ids=hf_ids,
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"].flip(-1),
        )

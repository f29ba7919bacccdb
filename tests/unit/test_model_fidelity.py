"""Settings on which LLaVA's loader and ecgvlm could silently disagree: matched or refused.

Each case is a config or file a real checkpoint may carry; the reference behaviour is LLaVA's
``load_pretrained_model`` and ``CLIPVisionTower`` (PULSE's vendored copy, see
tests/reference/README.md).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecgvlm.model import CheckpointError, PulseConfigError, load_pulse, make_tiny_pulse
from ecgvlm.model.pulse import VISION_PREFIX
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401


def _edit_config(path, drop=(), **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key)
    (path / "config.json").write_text(json.dumps(config))


def _logits(model, processor):
    batch = processor([llava_v1("Rhythm?")], [noise_image(300, 120, seed=3)])
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def frozen_tower_dir(tmp_path_factory):
    """unfreeze_mm_vision_tower false; vision_tower/ holds a tower unlike the shards' copy."""
    return make_tiny_pulse(tmp_path_factory.mktemp("frozen"), seed=0, tower_in_checkpoint=False)


def _tower(model):
    return model.model.vision_tower.vision_tower


def test_frozen_tower_comes_from_tower_directory_not_checkpoint(frozen_tower_dir, tmp_path):
    model, processor = load_pulse(frozen_tower_dir)
    standalone = load_file(str(frozen_tower_dir / "vision_tower" / "model.safetensors"))
    got = _tower(model).embeddings.class_embedding
    assert torch.equal(got, standalone["vision_model.embeddings.class_embedding"])
    ignored = [k for k in model.load_ignored_keys if k.startswith(VISION_PREFIX)]
    assert len(ignored) == len(standalone)
    # By construction: the same logits as a checkpoint whose shards carry the standalone tower
    # and whose flag says to use the checkpoint's tower (the path the golden logits cover).
    swapped = shutil.copytree(frozen_tower_dir, tmp_path / "swapped")
    for shard in sorted(swapped.glob("model-*.safetensors")):
        tensors = load_file(str(shard))
        for key in tensors:
            if key.startswith(VISION_PREFIX):
                tensors[key] = standalone[key[len(VISION_PREFIX) :]]
        save_file(tensors, str(shard), metadata={"format": "pt"})
    (swapped / "vision_tower" / "model.safetensors").unlink()
    _edit_config(swapped, unfreeze_mm_vision_tower=True)
    reference, _ = load_pulse(swapped)
    assert torch.equal(_logits(model, processor), _logits(reference, processor))
    # ... and not those of the checkpoint's own tower (what ecgvlm used to load).
    own = shutil.copytree(frozen_tower_dir, tmp_path / "own")
    _edit_config(own, unfreeze_mm_vision_tower=True)
    own_model, _ = load_pulse(own)
    diff = (_logits(own_model, processor) - _logits(model, processor)).abs().max().item()
    assert diff > 0.1


def test_absent_unfreeze_flag_means_frozen(frozen_tower_dir, tmp_path):
    ckpt = shutil.copytree(frozen_tower_dir, tmp_path / "ckpt")
    _edit_config(ckpt, drop=("unfreeze_mm_vision_tower",))
    model, _ = load_pulse(ckpt)
    standalone = load_file(str(ckpt / "vision_tower" / "model.safetensors"))
    got = _tower(model).embeddings.class_embedding
    assert torch.equal(got, standalone["vision_model.embeddings.class_embedding"])


def test_unfrozen_tower_comes_from_checkpoint(frozen_tower_dir, tmp_path):
    ckpt = shutil.copytree(frozen_tower_dir, tmp_path / "ckpt")
    _edit_config(ckpt, unfreeze_mm_vision_tower=True)
    model, _ = load_pulse(ckpt)
    shard_value = None
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        shard_value = load_file(str(shard)).get(
            VISION_PREFIX + "vision_model.embeddings.class_embedding", shard_value
        )
    assert torch.equal(_tower(model).embeddings.class_embedding, shard_value)


def test_frozen_tower_without_weights_on_disk_is_refused(frozen_tower_dir, tmp_path):
    ckpt = shutil.copytree(frozen_tower_dir, tmp_path / "ckpt")
    (ckpt / "vision_tower" / "model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match="unfreeze_mm_vision_tower is False.*vision_tower_path"
    ):
        load_pulse(ckpt)
    _edit_config(ckpt, mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14-336"):
        load_pulse(ckpt)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ("mm_use_im_patch_token", "lacks mm_use_im_patch_token.*<im_patch>"),
        ("mm_vision_select_layer", "lacks required key.*mm_vision_select_layer"),
    ],
)
def test_keys_llava_defaults_differently_must_be_present(tiny_pulse_dir, tmp_path, drop, match):
    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    _edit_config(ckpt, drop=(drop,))
    with pytest.raises(PulseConfigError, match=match):
        load_pulse(ckpt)


def test_stock_llava_model_type_is_accepted(tiny_pulse_dir, tmp_path):
    base, processor = load_pulse(tiny_pulse_dir)
    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    _edit_config(ckpt, model_type="llava")
    model, _ = load_pulse(ckpt)
    assert torch.equal(_logits(model, processor), _logits(base, processor))


@pytest.mark.parametrize(
    "changes",
    [
        {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]},
        {"model_type": "llava", "text_config": {"model_type": "llama"}},
    ],
)
def test_transformers_llava_format_is_refused(tiny_pulse_dir, tmp_path, changes):
    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    _edit_config(ckpt, **changes)
    with pytest.raises(PulseConfigError, match="model_type 'llava' is loaded only in LLaVA's own"):
        load_pulse(ckpt)


@pytest.mark.parametrize(
    "settings",
    [
        {"do_normalize": False},
        {"do_rescale": False},
        {"rescale_factor": 1 / 127.5, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5] * 3},
        # CLIP's own resize acts when shortest_edge differs from the crop: the filter counts.
        {"resample": 2, "size": {"shortest_edge": 64}},
        {"resample": 0, "size": {"shortest_edge": 64}},
    ],
)
def test_custom_preprocessor_settings_match_clip_image_processor(
    tiny_pulse_dir, tmp_path, settings
):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    pre_file = ckpt / "vision_tower" / "preprocessor_config.json"
    pre = {**json.loads(pre_file.read_text()), **settings}
    pre_file.write_text(json.dumps(pre))
    _, processor = load_pulse(ckpt)
    image = noise_image(300, 120, seed=5)
    ours = processor.image_processor(image)
    # LLaVA runs the CLIP processor over each anyres tile (PIL images of crop size).
    clip = CLIPImageProcessorPil(**{k: v for k, v in pre.items() if k != "image_processor_type"})
    tiles = processor.image_processor.tiles(image)
    theirs = torch.from_numpy(clip(tiles, return_tensors="np")["pixel_values"]).float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_unknown_preprocessor_setting_is_refused_by_name(tiny_pulse_dir, tmp_path):
    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    pre_file = ckpt / "vision_tower" / "preprocessor_config.json"
    pre_file.write_text(json.dumps({**json.loads(pre_file.read_text()), "do_pad": True}))
    with pytest.raises(CheckpointError, match="not implemented.*do_pad"):
        load_pulse(ckpt)


def test_checkpoint_generation_config_is_honoured(tiny_pulse_dir, tmp_path):
    from ecgvlm.infer import generate

    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    gen_file = ckpt / "generation_config.json"
    gen_file.write_text(json.dumps({**json.loads(gen_file.read_text()), "repetition_penalty": 5.0}))
    model, processor = load_pulse(ckpt)
    assert model.generation_config.repetition_penalty == 5.0
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    base, _ = load_pulse(tiny_pulse_dir)
    args = ([llava_v1("Rhythm?")], [noise_image(300, 120, seed=3)])
    (ours,) = generate(model, processor, *args, max_new_tokens=12)
    (plain,) = generate(base, processor, *args, max_new_tokens=12)
    base.generation_config.repetition_penalty = 5.0
    (explicit,) = generate(base, processor, *args, max_new_tokens=12)
    assert ours.text == explicit.text
    assert ours.text != plain.text


@pytest.mark.parametrize(
    ("edit", "name"),
    [
        ("added_tokens.json", "<im_patch>"),
        ("tokenizer_config.json", "<image>"),
        ("special_tokens_map.json", "<extra>"),
    ],
)
def test_extra_special_tokens_are_refused_by_name(tiny_pulse_dir, tmp_path, edit, name):
    ckpt = shutil.copytree(tiny_pulse_dir, tmp_path / "ckpt")
    if edit == "added_tokens.json":
        (ckpt / edit).write_text(json.dumps({name: 320}))
    elif edit == "tokenizer_config.json":
        cfg = json.loads((ckpt / edit).read_text())
        cfg["added_tokens_decoder"]["320"] = {"content": name, "special": True}
        (ckpt / edit).write_text(json.dumps(cfg))
    else:
        cfg = json.loads((ckpt / edit).read_text())
        (ckpt / edit).write_text(json.dumps({**cfg, "additional_special_tokens": [name]}))
    with pytest.raises(CheckpointError, match=f"tokens added beyond tokenizer.model.*{name}"):
        load_pulse(ckpt)

"""Tiny PULSE checkpoints: layout, determinism, loading and generation end to end."""

from __future__ import annotations

import json

import pytest
import torch

from ecgvlm.infer import Generation, generate
from ecgvlm.model import load_pulse, make_tiny_pulse
from ecgvlm.model.tiny import checkpoint_digest
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def tiny(tiny_pulse_dir):
    return load_pulse(tiny_pulse_dir)


def test_layout_matches_pulse(tiny_pulse_dir):
    config = json.loads((tiny_pulse_dir / "config.json").read_text())
    assert config["model_type"] == "llava_llama"
    assert config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_vision_select_layer"] == -2
    assert config["image_aspect_ratio"] == "anyres"
    assert config["mm_patch_merge_type"] == "flat"
    index = json.loads((tiny_pulse_dir / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) == 2
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert "model.mm_projector.0.weight" in keys and "model.mm_projector.2.weight" in keys
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in keys)
    assert any(k.startswith("model.layers.1.self_attn.q_proj") for k in keys)
    assert "model.image_newline" not in keys  # flat merge has no row-end vector
    size = sum(f.stat().st_size for f in tiny_pulse_dir.rglob("*") if f.is_file())
    assert size < 5_000_000
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_pulse_dir / name).is_file()


def test_make_tiny_is_deterministic(tiny_pulse_dir, tmp_path):
    again = make_tiny_pulse(tmp_path / "again", seed=0)
    other = make_tiny_pulse(tmp_path / "other", seed=1, merge="spatial_unpad")
    assert checkpoint_digest(again) == checkpoint_digest(tiny_pulse_dir)
    assert checkpoint_digest(other) != checkpoint_digest(tiny_pulse_dir)
    index = json.loads((other / "model.safetensors.index.json").read_text())
    assert "model.image_newline" in index["weight_map"]


def test_forward_loss_and_label_alignment(tiny):
    model, processor = tiny
    batch = processor([llava_v1("Which rhythm?")], [noise_image(220, 170, 0)])
    labels = batch["input_ids"].clone()
    labels[labels < 0] = -100
    out = model(**batch, labels=labels)
    n_feats = model.num_image_features((220, 170))
    assert out.logits.shape == (1, batch["input_ids"].shape[1] - 1 + n_feats, 320)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    # Loss only where labels are given: masking all text labels leaves nothing to learn.
    out_none = model(**batch, labels=torch.full_like(labels, -100))
    assert torch.isnan(out_none.loss) or out_none.loss.item() == 0


def test_generate_batch_equals_single(tiny):
    model, processor = tiny
    prompts = [llava_v1("What is the rhythm?"), llava_v1("Is there atrial fibrillation? A or B")]
    images = [noise_image(300, 120, 1), noise_image(90, 200, 2)]
    batch = generate(model, processor, prompts, images, max_new_tokens=6)
    singles = [
        generate(model, processor, [p], [i], max_new_tokens=6)[0] for p, i in zip(prompts, images)
    ]
    assert all(isinstance(g, Generation) for g in batch)
    assert [g.text for g in batch] == [g.text for g in singles]
    assert [g.completion_tokens for g in batch] == [g.completion_tokens for g in singles]
    assert batch[0].prompt_tokens == singles[0].prompt_tokens
    assert batch[0].prompt_tokens != batch[1].prompt_tokens
    assert all(1 <= g.completion_tokens <= 6 for g in batch)


def test_generate_seeded_sampling_is_reproducible(tiny):
    model, processor = tiny
    args = ([llava_v1("Describe the ECG.")], [noise_image(200, 150, 3)])
    a = generate(model, processor, *args, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(model, processor, *args, max_new_tokens=8, temperature=1.0, seed=7)
    assert a == b


def test_cli_make_tiny(tmp_path, capsys):
    from ecgvlm.cli import main

    assert main(["model", "make-tiny", str(tmp_path / "cli"), "--merge", "spatial_unpad"]) == 0
    assert "wrote tiny PULSE checkpoint (spatial_unpad, seed 0" in capsys.readouterr().out
    model, _ = load_pulse(tmp_path / "cli")
    assert model.pulse_config.patch_merge_type == "spatial_unpad"
    with pytest.raises(SystemExit):  # argparse refuses a merge type we do not write
        main(["model", "make-tiny", str(tmp_path / "bad"), "--merge", "diagonal"])
    capsys.readouterr()
    # Run again (the README's command twice): the tiny checkpoint is rewritten.
    assert main(["model", "make-tiny", str(tmp_path / "cli")]) == 0
    assert load_pulse(tmp_path / "cli")[0].pulse_config.patch_merge_type == "flat"
    # A real model there (a typo in the folder) is refused, its files left as they were.
    real = tmp_path / "PULSE-7B"
    real.mkdir()
    config = json.dumps({"hidden_size": 4096, "architectures": ["LlavaLlamaForCausalLM"]})
    (real / "config.json").write_text(config)
    (real / "model-00001-of-00003.safetensors").write_bytes(b"weights")
    assert main(["model", "make-tiny", str(real)]) == 2
    assert capsys.readouterr().err == (
        f"ecgvlm model: error: {real} already holds files (config.json, model-00001-of-00003"
        ".safetensors) and no tiny checkpoint: a tiny one written there would replace its "
        "config.json, tokenizer and weights; give a new or empty folder\n")
    assert sorted(p.name for p in real.iterdir()) == ["config.json",
                                                      "model-00001-of-00003.safetensors"]
    assert (real / "config.json").read_text() == config


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal_single(tiny, side):
    model, processor = tiny
    prompts = [llava_v1("Q"), llava_v1("A much longer question about the ST segment")]
    images = [noise_image(300, 120, 1), noise_image(90, 200, 2)]
    model.padding_side = side
    try:
        with torch.no_grad():
            batched = model(**processor(prompts, images)).logits
            singles = [model(**processor([p], [i])).logits[0] for p, i in zip(prompts, images)]
    finally:
        model.padding_side = "left"
    for row, single in enumerate(singles):
        n = single.shape[0]
        got = batched[row, -n:] if side == "left" else batched[row, :n]
        torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)


def test_training_validation_decodes_without_the_cache_deprecation(tiny):
    # transformers 5 logs (once per process, so a Ray worker's log showed it every run) when a
    # cache is passed or read as ``past_key_values``; the validation decoder uses its name.
    import logging

    from transformers.utils import logging as hf_logging

    from ecgvlm.prompt import build_prompt
    from ecgvlm.train.loop import greedy_tokens

    model, processor = tiny
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    hf_logging.get_logger("transformers.utils.generic").warning_once.cache_clear()
    try:
        tokens = greedy_tokens(model, processor, build_prompt("Rhythm?", ["Sinus", "AF"]),
                               noise_image(120, 90, 3), 4, torch.device("cpu"), torch.float32)
        # The check itself can fail: reading the old name does log.
        hf_logging.get_logger("transformers.utils.generic").warning_once.cache_clear()
        _ = model(**processor([llava_v1("Rate?")], [noise_image(60, 40, 3)]), use_cache=True).past_key_values
    finally:
        root.removeHandler(handler)
    assert len(tokens) == 4
    deprecations = [m for m in seen if "deprecated" in m]
    assert deprecations == ["`past_key_values`/`cache_params` are deprecated. Use `cache` instead."]


def test_cached_decoding_raises_no_deprecation_and_matches_a_full_forward(tiny):
    # transformers 5 warns on every ``past_key_values`` (835 warnings per suite before);
    # the model hands the cache on under the name its parent takes.
    import warnings

    model, processor = tiny
    batch = processor([llava_v1("What is the rhythm?")], [noise_image(120, 90, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(**batch, use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        length = out.logits.shape[1] + 1
        step = model(input_ids=token, attention_mask=torch.ones((1, length), dtype=torch.long),
                     past_key_values=out.past_key_values, use_cache=True)
    embeds, mask, _, _ = model.merge_inputs(batch["input_ids"], batch["attention_mask"],
                                            batch["pixel_values"], batch["image_sizes"])
    full = model(inputs_embeds=torch.cat([embeds, model.get_input_embeddings()(token)], dim=1),
                 attention_mask=torch.ones((1, length), dtype=torch.long))
    torch.testing.assert_close(step.logits[0, -1], full.logits[0, -1], atol=1e-4, rtol=1e-4)

"""LoRA as in the study: language model q/k/v/o only, r=4, alpha=8, bias=lora_only."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from ecgvlm.infer import generate
from ecgvlm.model import load_pulse
from ecgvlm.model.lora import (
    attach_lora,
    load_adapter,
    merge_lora,
    parameter_counts,
    trainable_parameter_count,
    unload_adapter,
)
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401


@pytest.fixture()
def fresh(tiny_pulse_dir):
    return load_pulse(tiny_pulse_dir)


@pytest.fixture(scope="module")
def batch(tiny_pulse_dir):
    _, processor = load_pulse(tiny_pulse_dir)
    return processor(
        [llava_v1("Rhythm?"), llava_v1("Axis?")], [noise_image(200, 90, 0), noise_image(64, 64, 1)]
    )


def _randomise_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_lora_only_on_language_model(fresh):
    model, _ = fresh
    peft_model = attach_lora(model)
    trainable, total = parameter_counts(peft_model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    print(f"trainable parameters: {trainable} of {total}")
    cfg = model.config
    # Each adapted Linear(d, d) gets A (r x d) and B (d x r); Llama q/k/v/o have no bias.
    per_layer = 4 * (4 * cfg.hidden_size + cfg.hidden_size * 4)
    assert trainable == trainable_parameter_count(peft_model) == cfg.num_hidden_layers * per_layer
    assert names and all(".model.layers." in n and "lora_" in n for n in names)
    assert not any("vision_tower" in n for n in names)
    lora_modules = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_modules) == 4 * cfg.num_hidden_layers
    assert not any("vision_tower" in n for n in lora_modules)
    # The CLIP tower does have modules of these names; a bare name list would have caught them.
    assert any(n.endswith("self_attn.q_proj") for n, _ in model.model.vision_tower.named_modules())


def test_lora_trains_and_vision_stays_frozen(fresh, batch):
    model, _ = fresh
    peft_model = attach_lora(model)
    peft_model.train()
    vision_before = {n: p.clone() for n, p in model.model.vision_tower.named_parameters()}
    labels = batch["input_ids"].clone()
    labels[labels < 0] = -100
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.model.vision_tower.named_parameters():
        assert torch.equal(p, vision_before[n]) and p.grad is None


def test_adapter_save_load_unload_and_merge(fresh, tiny_pulse_dir, batch, tmp_path):
    model, processor = fresh
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = attach_lora(model, dropout=0.0)
    _randomise_lora(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**batch).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "ecg_lora")

    other, _ = load_pulse(tiny_pulse_dir)
    loaded = load_adapter(other, tmp_path / "ecg_lora")
    assert loaded.active_adapter == "ecg_lora"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted, atol=1e-5, rtol=0)
    # Generation goes through the adapter (the PEFT wrapper is unwrapped, adapters stay).
    (answer,) = generate(loaded, processor, [llava_v1("Rhythm?")], [noise_image(200, 90, 0)], 4)
    assert answer.completion_tokens >= 1
    # Unloading the last adapter gives back the bare model with its original outputs.
    bare = unload_adapter(loaded, "ecg_lora")
    assert not any(isinstance(m, LoraLayer) for m in bare.modules())
    with torch.no_grad():
        torch.testing.assert_close(bare(**batch).logits, base_logits, atol=1e-5, rtol=0)

    merged = merge_lora(peft_model)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-3, rtol=1e-4)


def test_attach_lora_rejects_bad_arguments(fresh):
    model, _ = fresh
    with pytest.raises(ValueError, match="bias"):
        attach_lora(model, bias="some")
    with pytest.raises(ValueError, match="r must be"):
        attach_lora(model, r=0)


def _llava_lora_target_names(model) -> list[str]:
    """The rule LLaVA's train.py applies to its model: the last name component of every
    Linear outside the projector and vision tower, lm_head left out."""
    names = set()
    for name, module in model.named_modules():
        if any(word in name for word in ("mm_projector", "vision_tower", "vision_resampler")):
            continue
        if isinstance(module, torch.nn.Linear):
            names.add(name.split(".")[-1])
    names.discard("lm_head")
    return sorted(names)


@pytest.mark.parametrize("weights_file", ["adapter_model.safetensors", "adapter_model.bin"])
def test_adapter_named_as_llava_training_names_it_loads(fresh, batch, tmp_path, weights_file):
    import json

    from safetensors.torch import save_file

    model, _ = fresh
    targets = _llava_lora_target_names(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    r, alpha = 8, 16
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "bias": "none",
        "target_modules": targets,
        "base_model_name_or_path": "liuhaotian/llava-v1.6-vicuna-7b",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    gen = torch.Generator().manual_seed(7)
    tensors, deltas = {}, {}
    for name, module in model.named_modules():
        lm_linear = isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
        if lm_linear and name.split(".")[-1] in targets:
            a = torch.randn(r, module.in_features, generator=gen) * 0.3
            b = torch.randn(module.out_features, r, generator=gen) * 0.3
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            deltas[name] = (alpha / r) * b @ a
    adapter = tmp_path / "llava_lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    if weights_file.endswith(".bin"):
        torch.save(tensors, adapter / weights_file)
    else:
        save_file(tensors, str(adapter / weights_file))
    # What the adapter should compute: its deltas merged into the weights by hand.
    expected_model, _ = load_pulse(model.config._name_or_path)
    with torch.no_grad():
        base = expected_model(**batch).logits
        modules = dict(expected_model.named_modules())
        for name, delta in deltas.items():
            modules[name].weight += delta
        expected = expected_model(**batch).logits
    peft_model = load_adapter(model, adapter)
    with torch.no_grad():
        got = peft_model(**batch).logits
    # float32 rounding of merged vs separate products; every LM Linear carries a delta.
    assert (got - expected).abs().max().item() <= 2e-4
    assert (got - base).abs().max().item() > 0.1
    # LLaVA's LoRA runs may save a tuned projector next to the adapter: refused, not skipped.
    (adapter / "non_lora_trainables.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="non_lora_trainables.bin"):
        load_adapter(load_pulse(model.config._name_or_path)[0], adapter)


def test_our_adapter_names_only_llava_checkpoint_modules(fresh, tiny_pulse_dir, tmp_path):
    import json
    import re

    from safetensors import safe_open

    from ecgvlm.model.lora import language_model_target_regex, save_adapter

    model, _ = fresh
    out = save_adapter(attach_lora(model), tmp_path / "ours")
    index = json.loads((tiny_pulse_dir / "model.safetensors.index.json").read_text())
    llava_keys = set(index["weight_map"])  # LLaVA's own parameter names, as its code saves them
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert len(keys) == 2 * 2 * 4  # 2 layers x q/k/v/o x lora_A/lora_B
    for key in keys:
        module = re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", key)
        assert f"{module}.weight" in llava_keys, key
    regex = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert regex == language_model_target_regex()
    matched = {
        k[: -len(".weight")] for k in llava_keys if re.fullmatch(regex, k[: -len(".weight")])
    }
    assert len(matched) == 8 and all(m.startswith("model.layers.") for m in matched)

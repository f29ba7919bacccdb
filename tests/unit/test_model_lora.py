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

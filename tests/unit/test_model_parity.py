"""Parity with the reference LLaVA code (PULSE's vendored copy), through golden logits.

tests/reference/make_golden.py ran LLaVA's own classes and preprocessing on tiny checkpoints
that ``make_tiny_pulse(seed=0)`` rebuilds here byte for byte; see tests/reference/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ecgvlm.model import load_pulse, make_tiny_pulse
from ecgvlm.model.processor import LlamaSentencePieceTokenizer
from ecgvlm.model.tiny import checkpoint_digest
from tests.unit.pulse_support import llava_v1, one_torch_thread  # noqa: F401

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference"
sys.path.insert(0, str(REFERENCE_DIR))
from make_golden import (  # noqa: E402
    CASES,
    CHECKPOINTS,
    GREEDY_TOKENS,
    IMAGE_PROMPT_CASES,
    REFERENCE_PACKAGES,
    SEED,
    TAIL,
    TOKENIZER_CASES,
    case_image,
)

GOLDEN = np.load(REFERENCE_DIR / "golden_logits.npz")
ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def loaded(request, tmp_path_factory):
    merge = request.param
    path = make_tiny_pulse(
        tmp_path_factory.mktemp(f"parity_{merge}"), seed=SEED, **CHECKPOINTS[merge]
    )
    assert checkpoint_digest(path) == str(GOLDEN[f"{merge}/digest"]), (
        "make_tiny_pulse no longer writes the checkpoint the golden logits were made from; "
        "regenerate them (tests/reference/README.md)"
    )
    model, processor = load_pulse(path)
    return merge, model, processor


def test_llava_v1_prompt_matches_reference_template():
    for i, (question, _, _) in enumerate(CASES):
        assert llava_v1(question) == str(GOLDEN[f"prompt/{i}"])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_logits_match_reference(loaded, case):
    merge, model, processor = loaded
    key = f"{merge}/{case}"
    image = case_image(case)
    batch = processor([llava_v1(CASES[case][0])], [image])
    assert batch["input_ids"][0].tolist() == GOLDEN[f"{key}/input_ids"].tolist()
    labels = batch["input_ids"].clone()
    labels[:, :8] = -100
    with torch.no_grad():
        out = model(**batch, labels=labels)
    logits = out.logits[0]
    assert logits.shape[0] == int(GOLDEN[f"{key}/n_positions"])
    assert logits.shape[0] == batch["input_ids"].shape[1] - 1 + model.num_image_features(image.size)
    tail = torch.from_numpy(GOLDEN[f"{key}/logits_tail"])
    lse = torch.from_numpy(GOLDEN[f"{key}/logsumexp"])
    diff = max(
        (logits[-TAIL:] - tail).abs().max().item(),
        (torch.logsumexp(logits, -1) - lse).abs().max().item(),
    )
    print(f"{key}: max abs diff vs reference {diff:.2e}")
    assert diff <= ATOL
    assert logits.argmax(-1).tolist() == GOLDEN[f"{key}/argmax"].tolist()
    assert abs(out.loss.item() - float(GOLDEN[f"{key}/loss"])) <= ATOL
    greedy = model.generate(
        **batch, do_sample=False, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS
    )
    reference = GOLDEN[f"{key}/greedy"].tolist()
    # transformers 4.37's generate from inputs_embeds puts BOS in front of the new tokens.
    if len(reference) == GREEDY_TOKENS + 1 and reference[0] == processor.tokenizer.bos_token_id:
        reference = reference[1:]
    assert greedy[0].tolist() == reference


def test_golden_records_reference_versions():
    versions = json.loads(str(GOLDEN["versions"]))
    assert versions["transformers"] == "4.37.2" and versions["torch"].startswith("2.1.2")
    assert set(REFERENCE_PACKAGES) <= set(versions)
    assert versions["llava_source"] == "AIMedLab/PULSE@a439b6c"
    readme = (REFERENCE_DIR / "README.md").read_text()
    for name in REFERENCE_PACKAGES:  # the README names every recorded version
        assert f"{name} {versions[name]}" in readme, name


@pytest.mark.parametrize("legacy", [False, True])
def test_tokenizer_matches_reference_slow_llama_tokenizer(tiny_pulse_dir, tmp_path, legacy):
    for name in ("tokenizer.model", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tiny_pulse_dir / name).read_bytes())
    config = json.loads((tiny_pulse_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    tokenizer = LlamaSentencePieceTokenizer(tmp_path)
    ours = [tokenizer.encode(t) for t in TOKENIZER_CASES]
    ours += [tokenizer.tokenize_with_image(t) for t in IMAGE_PROMPT_CASES]
    key = f"tokens/legacy={legacy}"
    flat, lengths = GOLDEN[f"{key}/ids"].tolist(), GOLDEN[f"{key}/lengths"].tolist()
    starts = np.cumsum([0, *lengths])
    reference = [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]
    for text, mine, theirs in zip(TOKENIZER_CASES + IMAGE_PROMPT_CASES, ours, reference):
        assert mine == theirs, text

"""Make the golden logits that ecgvlm's PULSE must match: the reference LLaVA code's output.

Two steps, two Python environments (see README.md in this folder for the exact commands):

1. ``checkpoints`` (ecgvlm's environment): write the tiny random checkpoints, one per merge
   type, with ``ecgvlm.model.make_tiny_pulse(seed=0)``, plus their digests.
2. ``reference`` (a throwaway environment with the reference's pinned torch/transformers and
   the LLaVA source that PULSE vendors on ``PYTHONPATH``): load each checkpoint with LLaVA's own
   classes, run LLaVA's own preprocessing (``process_images``, ``tokenizer_image_token``,
   ``conv_templates['llava_v1']``) on the cases below, and save per case: the input ids, the
   full logits of the last positions, logsumexp and argmax at every position, the loss with
   text labels, and 8 greedy tokens.

This file imports nothing from ecgvlm in the ``reference`` step; ``CASES`` and
``case_image`` are shared with the parity test, which rebuilds the same inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MERGES = ("flat", "spatial", "spatial_unpad")
# Checkpoint name -> make_tiny_pulse arguments: one per merge type, plus PULSE's flat layout
# with unfreeze_mm_vision_tower false (tower weights from vision_tower/, not the shards).
CHECKPOINTS: dict[str, dict[str, object]] = {
    **{merge: {"merge": merge} for merge in MERGES},
    "flat_frozen_tower": {"merge": "flat", "tower_in_checkpoint": False},
}
# Distributions whose versions the reference step records in the npz.
REFERENCE_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "accelerate",
    "numpy",
    "Pillow",
    "protobuf",
    "safetensors",
)
SEED = 0
TAIL = 16
GREEDY_TOKENS = 8
# (question, image width, image height): wide (3x1 tiles), tall (1x3), near square (2x2).
CASES = (
    ("What is the rhythm in this ECG?", 300, 120),
    ("Answer with a letter: A. Normal sinus rhythm B. Atrial fibrillation", 90, 200),
    ("Describe the ST segment.", 220, 170),
)

# Plain tokenisation cases (both Llama ``legacy`` settings): special tokens inside text, as in
# training targets ending in "</s>", spaces, newlines and bytes outside the tiny vocabulary.
TOKENIZER_CASES = (
    "What is the rhythm?",
    " leading space and  two spaces",
    "The answer is B. Atrial fibrillation.</s>",
    "USER: <image>\nQ ASSISTANT: B</s>",
    "</s>starts with a special token",
    "a<s>b<unk>c\n\nd",
    "\u00fcmlaut \u00e9 \u2192 \u2665 72 bpm",
    "",
)
IMAGE_PROMPT_CASES = ("X <image>\nY ASSISTANT: A</s>", "<image>\nfirst", "last <image>")


def case_image(index: int) -> Image.Image:
    """A deterministic RGB test image: noise over gradients (hard on resampling)."""
    _, width, height = CASES[index]
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_checkpoints(out: Path) -> None:
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.model.tiny import checkpoint_digest

    digests = {}
    for name, kwargs in CHECKPOINTS.items():
        path = make_tiny_pulse(out / name, seed=SEED, **kwargs)
        digests[name] = checkpoint_digest(path)
    (out / "digests.json").write_text(json.dumps(digests, indent=2) + "\n")
    print(json.dumps(digests, indent=2))


def _reference_model(checkpoint: Path, work: Path):
    """Load a checkpoint the way LLaVA's load_pretrained_model does, in float32 on CPU."""
    import torch
    from llava.model import LlavaLlamaForCausalLM
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    # LLaVA loads the CLIP tower by path (mm_vision_tower, relative to the working directory).
    # With unfreeze_mm_vision_tower true the checkpoint's tower weights then overwrite it, so
    # that directory gets a copy of them; with false the directory's own weights are the
    # standalone tower (make_tiny_pulse wrote them) and the checkpoint's are ignored.
    local = work / checkpoint.name
    shutil.copytree(checkpoint, local)
    prefix = "model.vision_tower.vision_tower."
    tower_file = local / "vision_tower" / "model.safetensors"
    frozen = not json.loads((local / "config.json").read_text()).get("unfreeze_mm_vision_tower")
    if not frozen:
        tower = {}
        for shard in sorted(local.glob("model-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        tower[key[len(prefix) :]] = f.get_tensor(key)
        save_file(tower, str(tower_file), metadata={"format": "pt"})
    cwd = os.getcwd()
    os.chdir(local)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local), use_fast=False)
        model = LlavaLlamaForCausalLM.from_pretrained(
            str(local), low_cpu_mem_usage=True, torch_dtype=torch.float32
        )
        model.resize_token_embeddings(len(tokenizer))
        vision_tower = model.get_vision_tower()
        if not vision_tower.is_loaded:
            vision_tower.load_model()
    finally:
        os.chdir(cwd)
    vision_tower.to(dtype=torch.float32)
    model.eval()
    # Every weight the reference uses must be the checkpoint's (no meta or re-initialised ones).
    # For a frozen tower, its weights must be the standalone ones and differ from the shards'.
    state = model.state_dict()
    checked = 0
    for shard in sorted(local.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key in state and not (frozen and key.startswith(prefix)):
                    assert torch.equal(state[key], f.get_tensor(key)), key
                    checked += 1
                elif key in state:
                    assert not torch.equal(state[key], f.get_tensor(key)), key
    if frozen:
        with safe_open(str(tower_file), framework="pt") as f:
            for key in f.keys():
                assert torch.equal(state[prefix + key], f.get_tensor(key)), key
                checked += 1
    assert checked == len(state), (checked, len(state), sorted(state)[:5])
    return model, tokenizer, vision_tower.image_processor


def reference_tokenizations(checkpoint: Path) -> dict[str, np.ndarray]:
    """The slow LlamaTokenizer's ids for TOKENIZER_CASES and IMAGE_PROMPT_CASES, per legacy."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer

    out: dict[str, np.ndarray] = {}
    for legacy in (False, True):
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), use_fast=False, legacy=legacy)
        rows = [tokenizer(text).input_ids for text in TOKENIZER_CASES]
        rows += [tokenizer_image_token(t, tokenizer, IMAGE_TOKEN_INDEX) for t in IMAGE_PROMPT_CASES]
        key = f"tokens/legacy={legacy}"
        out[f"{key}/ids"] = np.array([i for row in rows for i in row], dtype=np.int64)
        out[f"{key}/lengths"] = np.array([len(row) for row in rows], dtype=np.int64)
    return out


def run_reference(checkpoints: Path, out_file: Path) -> None:
    import torch
    import transformers
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    torch.manual_seed(0)
    golden: dict[str, np.ndarray] = {}
    digests = json.loads((checkpoints / "digests.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for merge in CHECKPOINTS:
            model, tokenizer, image_processor = _reference_model(checkpoints / merge, work)
            golden[f"{merge}/digest"] = np.array(digests[merge])
            for i, (question, _, _) in enumerate(CASES):
                conv = conv_templates["llava_v1"].copy()
                conv.append_message(conv.roles[0], "<image>\n" + question)
                conv.append_message(conv.roles[1], None)
                prompt = conv.get_prompt()
                image = case_image(i)
                images = process_images([image], image_processor, model.config)
                ids = tokenizer_image_token(
                    prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt"
                )
                ids = ids.unsqueeze(0)
                labels = ids.clone()
                labels[:, :8] = -100  # some ignored positions, as masking the system prompt does
                with torch.no_grad():
                    out = model(
                        input_ids=ids, images=images, image_sizes=[image.size], labels=labels
                    )
                    greedy = model.generate(
                        ids,
                        images=images,
                        image_sizes=[image.size],
                        do_sample=False,
                        max_new_tokens=GREEDY_TOKENS,
                        min_new_tokens=GREEDY_TOKENS,
                        pad_token_id=tokenizer.pad_token_id,
                        use_cache=True,
                    )
                logits = out.logits[0].float()
                key = f"{merge}/{i}"
                golden[f"{key}/input_ids"] = ids[0].numpy()
                golden[f"{key}/n_positions"] = np.array(logits.shape[0])
                golden[f"{key}/logits_tail"] = logits[-TAIL:].numpy()
                golden[f"{key}/logsumexp"] = torch.logsumexp(logits, -1).numpy()
                golden[f"{key}/argmax"] = logits.argmax(-1).numpy()
                golden[f"{key}/loss"] = np.array(out.loss.item())
                golden[f"{key}/greedy"] = greedy[0].numpy()
                golden[f"prompt/{i}"] = np.array(prompt)
                print(merge, i, tuple(images.shape), logits.shape[0], float(out.loss))
    golden.update(reference_tokenizations(checkpoints / "flat"))
    from importlib.metadata import version

    versions = {"python": sys.version.split()[0], "llava_source": "AIMedLab/PULSE@a439b6c"}
    versions.update({name: version(name) for name in REFERENCE_PACKAGES})
    # torch's own string carries the build (e.g. "+cu121"); the wheel's metadata does not.
    versions.update(torch=torch.__version__, transformers=transformers.__version__)
    golden["versions"] = np.array(json.dumps(versions))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_file, **golden)
    print(f"wrote {out_file} ({out_file.stat().st_size} bytes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("checkpoints")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("reference")
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "checkpoints":
        make_checkpoints(args.out)
    else:
        run_reference(args.checkpoints, args.out)


if __name__ == "__main__":
    main()

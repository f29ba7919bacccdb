"""Load PULSE (a local PULSE-7B directory, a random model of PULSE-7B's exact shape, or a tiny
checkpoint), answer one ECG printout, and print load time, peak memory and tokens/s.

Run through scripts/gpu_check_pulse.sh, which bounds it to 8 minutes. See docs/model.md.
"""

from __future__ import annotations

import argparse
import io
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ecgvlm.infer import generate
from ecgvlm.model import load_pulse, make_tiny_pulse
from ecgvlm.model.config import PULSE_7B_CONFIG
from ecgvlm.model.processor import (
    ImagePreprocessConfig,
    LlamaSentencePieceTokenizer,
    PulseImageProcessor,
    PulseProcessor,
)

QUESTION = (
    "What is the most likely diagnosis? A. Normal sinus rhythm B. Atrial fibrillation "
    "C. First degree AV block D. Left bundle branch block. Answer with the letter, then explain."
)
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def llava_v1_prompt(question: str) -> str:
    """The llava_v1 prompt; ecgvlm.prompt's builder is used when that module is present."""
    try:
        from ecgvlm import prompt as prompt_module

        build = getattr(prompt_module, "llava_v1_prompt", None)
        if build is not None:
            return build(question)
    except ImportError:
        pass
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


def synthetic_printout(width_px: int = 2200, height_px: int = 1700) -> Image.Image:
    """A printout-like image: 5 mm grid and 12 traces of PQRST-shaped beats at 75 bpm."""
    image = Image.new("RGB", (width_px, height_px), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    px_per_mm = width_px / 280
    for i in range(int(280 / 5) + 1):
        x = i * 5 * px_per_mm
        draw.line([(x, 0), (x, height_px)], fill=(240, 170, 170), width=1)
    for j in range(int(height_px / (5 * px_per_mm)) + 1):
        y = j * 5 * px_per_mm
        draw.line([(0, y), (width_px, y)], fill=(240, 170, 170), width=1)
    rows = 12
    for row in range(rows):
        base = (row + 0.5) * height_px / rows
        points = []
        for x in range(width_px):
            t = (x / px_per_mm / 25.0) % 0.8  # 25 mm/s, 0.8 s per beat
            mv = 1.2 * math.exp(-(((t - 0.3) / 0.012) ** 2)) + 0.15 * math.exp(
                -(((t - 0.12) / 0.03) ** 2)
            )
            mv += 0.3 * math.exp(-(((t - 0.55) / 0.05) ** 2))
            points.append((x, base - mv * 10 * px_per_mm))
        draw.line(points, fill=(0, 0, 0), width=2)
    return image


def ecg_image(record: str | None) -> tuple[Image.Image, str]:
    """Render a real record with ecgvlm.render where that exists; else the synthetic one."""
    if record:
        try:
            from ecgvlm.render import render_printout
            from ecgvlm.signal import read_record
        except ImportError as e:
            raise SystemExit(f"--record needs ecgvlm.render and ecgvlm.signal: {e}") from e
        printout = render_printout(read_record(record))
        return Image.open(io.BytesIO(printout.png)).convert("RGB"), f"rendered {record}"
    return synthetic_printout(), "synthetic 2200x1700 printout"


def random_7b(dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, PulseProcessor]:
    """PULSE-7B's exact shape, random weights, no download; a tiny tokenizer for the prompt."""
    from transformers import CLIPVisionConfig

    from ecgvlm.model.checkpoint import KNOWN_VISION_TOWERS
    from ecgvlm.model.pulse import build_pulse

    vision = CLIPVisionConfig(**KNOWN_VISION_TOWERS[PULSE_7B_CONFIG["mm_vision_tower"]])
    model = build_pulse(dict(PULSE_7B_CONFIG), vision, dtype=dtype, device=device).eval()
    with tempfile.TemporaryDirectory(prefix="pulse-tok-") as tmp:
        make_tiny_pulse(tmp)  # only its tokenizer is used: every id it makes is < 32000
        tokenizer = LlamaSentencePieceTokenizer(Path(tmp))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = PulseImageProcessor(
        ImagePreprocessConfig(336, 336), PULSE_7B_CONFIG["image_grid_pinpoints"]
    )
    return model, PulseProcessor(tokenizer, image_processor)


def peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="local PULSE-7B directory (LLaVA layout)")
    source.add_argument("--random-7b", action="store_true", help="random weights, PULSE-7B shape")
    source.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (CPU smoke)")
    parser.add_argument("--vision-tower-path", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument(
        "--record", default=None, help="WFDB record to render (needs ecgvlm.render)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]

    started = time.perf_counter()
    if args.random_7b:
        what = "random PULSE-7B-shaped model"
        model, processor = random_7b(dtype, args.device)
    elif args.tiny:
        what = "tiny random checkpoint"
        with tempfile.TemporaryDirectory(prefix="pulse-tiny-") as tmp:
            model, processor = load_pulse(make_tiny_pulse(tmp), dtype=dtype, device=args.device)
    else:
        what = f"checkpoint {args.model_dir}"
        model, processor = load_pulse(
            args.model_dir,
            dtype=dtype,
            device=args.device,
            vision_tower_path=args.vision_tower_path,
        )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {what}; {n_params / 1e9:.4f} B parameters, {dtype}, {args.device}")
    print(f"merge: {model.pulse_config.patch_merge_type}; load time: {load_s:.1f} s")

    image, image_what = ecg_image(args.record)
    prompt = llava_v1_prompt(QUESTION)
    # A first short call warms up kernels so that tokens/s measures steady generation.
    generate(model, processor, [prompt], [image], max_new_tokens=2)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    (answer,) = generate(model, processor, [prompt], [image], max_new_tokens=args.max_new_tokens)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    print(f"image: {image_what}, {image.size[0]}x{image.size[1]} px")
    print(f"prompt tokens (text + image features): {answer.prompt_tokens}")
    print(
        f"completion tokens: {answer.completion_tokens} in {gen_s:.2f} s "
        f"= {answer.completion_tokens / gen_s:.1f} tokens/s"
    )
    print(
        f"peak memory: {peak_memory_gib(args.device):.2f} GiB "
        f"({'GPU allocated' if args.device.startswith('cuda') else 'process RSS'})"
    )
    print(f"answer: {answer.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

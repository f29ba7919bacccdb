"""GPU acceptance for PULSE in one command: parity, a PULSE-7B-shaped model, LoRA steps, generation.

Run through scripts/gpu_acceptance.sh (bounded to 8 minutes), on a machine with one GPU and
only torch, transformers, peft, safetensors, sentencepiece, tokenizers, numpy and Pillow:

1. parity: the tiny checkpoints of tests/reference/ (rebuilt with ``make_tiny_pulse``, checked
   by digest) against the reference LLaVA code's golden logits, in float32 (must agree as the
   unit test requires: logits within 1e-4, same argmax and greedy tokens), bfloat16 and
   float16 (the largest difference reached is reported);
2. a random-weight model of PULSE-7B's exact shape, built on the device in bfloat16;
3. a few LoRA training steps on it (the study's r=4, alpha=8, q/k/v/o) on a printout-sized
   ECG: tokens/s, peak memory, MFU; through DeepSpeed when it is importable, else torch AdamW;
4. batched greedy generation on printout-sized ECGs at batch 1 and 16: ECGs/s;
5. what the server relies on (``ecgvlm.infer``, as ``PulseRunner`` calls it): answers unchanged
   after a forward with ``output_hidden_states`` (the CLIP layer), the batch token budget from
   free memory with peak memory at batch 8 against that budget's bound, and an out-of-memory
   error induced by capping the process's GPU memory: the prompts that cannot fit are answered
   ``OutOfMemory`` (the endpoint's 503), and allocated memory returns to its baseline.

It prints one table and exits 1 when a parity check fails, 2 when another step errors.
``--device cpu --tiny`` runs every step on CPU with the tiny checkpoint in place of the 7B
shape (the unit test does this). See docs/model.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT / "tests" / "reference"
sys.path.insert(0, str(REFERENCE_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check_pulse import random_7b, synthetic_printout
from make_golden import CASES, CHECKPOINTS, GREEDY_TOKENS, SEED, TAIL, case_image

from ecgvlm.model import attach_lora, load_pulse, make_tiny_pulse
from ecgvlm.model.tiny import checkpoint_digest

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP32_ATOL = 1e-4  # the unit test's bound (tests/unit/test_model_parity.py)
# Dense bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
QUESTION = "What is the most likely diagnosis? A. Normal sinus rhythm B. Atrial fibrillation"
ANSWER = " B. Atrial fibrillation: irregularly irregular rhythm without P waves."


@dataclass
class Row:
    """One line of the result table."""

    check: str
    setting: str
    result: str
    ok: bool | None  # None: measured, nothing to pass or fail


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    return "n/a on cpu"


# -- 1. parity ----------------------------------------------------------------------------


def parity_rows(device: str, dtype_names: list[str], golden: Any) -> list[Row]:
    """Tiny checkpoints vs golden logits, per checkpoint and dtype."""
    names = sorted(CHECKPOINTS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pulse-parity-") as tmp:
        paths = {}
        for name in names:
            path = make_tiny_pulse(Path(tmp) / name, seed=SEED, **CHECKPOINTS[name])
            if checkpoint_digest(path) != str(golden[f"{name}/digest"]):
                rows.append(Row(f"parity {name}", "digest", "tiny build differs", False))
                continue
            paths[name] = path
        for dtype_name in dtype_names:
            for name, path in paths.items():
                rows.append(_parity_one(name, path, device, dtype_name, golden))
    return rows


def _parity_one(name: str, path: Path, device: str, dtype_name: str, golden: Any) -> Row:
    model, processor = load_pulse(path, dtype=DTYPES[dtype_name], device=device)
    worst, argmax_agree, argmax_total, greedy_equal, finite = 0.0, 0, 0, 0, True
    for i in range(len(CASES)):
        key = f"{name}/{i}"
        batch = processor([str(golden[f"prompt/{i}"])], [case_image(i)])
        if batch["input_ids"][0].tolist() != golden[f"{key}/input_ids"].tolist():
            return Row(f"parity {name}", dtype_name, "input ids differ", False)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            logits = model(**batch).logits[0].float().cpu()
        finite = finite and bool(torch.isfinite(logits).all())
        tail = torch.from_numpy(golden[f"{key}/logits_tail"])
        lse = torch.from_numpy(golden[f"{key}/logsumexp"])
        worst = max(
            worst,
            (logits[-TAIL:] - tail).abs().max().item(),
            (torch.logsumexp(logits, -1) - lse).abs().max().item(),
        )
        reference_argmax = golden[f"{key}/argmax"].tolist()
        argmax_agree += sum(a == b for a, b in zip(logits.argmax(-1).tolist(), reference_argmax))
        argmax_total += len(reference_argmax)
        greedy = model.generate(
            **batch, do_sample=False, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS
        )
        reference = golden[f"{key}/greedy"].tolist()
        # transformers 4.37's generate from inputs_embeds puts BOS in front of the new tokens.
        if len(reference) == GREEDY_TOKENS + 1 and reference[0] == processor.tokenizer.bos_token_id:
            reference = reference[1:]
        greedy_equal += greedy[0].cpu().tolist() == reference
    n = len(CASES)
    result = (
        f"max |diff| {worst:.1e}; argmax {argmax_agree}/{argmax_total}; greedy {greedy_equal}/{n}"
    )
    if dtype_name == "fp32":
        ok = worst <= FP32_ATOL and argmax_agree == argmax_total and greedy_equal == n
    else:
        ok = finite  # half precision: the tolerance reached is the result, not a pass mark
    return Row(f"parity {name}", dtype_name, result, ok)


# -- 2. the PULSE-7B-shaped model ----------------------------------------------------------


def build_model(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, str]:
    dtype = DTYPES[args.model_dtype]
    if args.tiny:
        model, processor = load_pulse(
            make_tiny_pulse(tmp / "tiny"), dtype=dtype, device=args.device
        )
        return model, processor, "tiny checkpoint"
    model, processor = random_7b(dtype, args.device)
    return model, processor, "random weights, PULSE-7B shape"


def printout_image() -> tuple[Image.Image, str]:
    """A printout from ecgvlm.render of a synthetic 12-lead ECG; the drawn stand-in without it."""
    try:
        from ecgvlm.records import EcgRecord
        from ecgvlm.render import render_printout
    except ImportError as e:
        return synthetic_printout(), f"synthetic printout (ecgvlm.render unavailable: {e})"
    fs_hz, duration_s = 500, 10
    t = np.arange(fs_hz * duration_s) / fs_hz
    phase = t % 0.8  # 75 bpm
    beat = 1.2 * np.exp(-(((phase - 0.3) / 0.012) ** 2)) + 0.3 * np.exp(
        -(((phase - 0.55) / 0.05) ** 2)
    )
    leads = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    gains = np.linspace(-0.6, 1.2, len(leads))
    signal = (beat[:, None] * gains[None, :]).astype(np.float32)
    record = EcgRecord("synthetic/75bpm", "synthetic", signal, float(fs_hz), leads)
    printout = render_printout(record)
    return Image.open(io.BytesIO(printout.png)).convert("RGB"), "ecgvlm.render printout"


def lm_linear_parameters(model: Any) -> int:
    """Parameters of the language model's Linear layers (the matmul FLOPs per token / 2)."""
    total = 0
    for name, module in model.named_modules():
        is_lm = "vision_tower" not in name and "mm_projector" not in name
        if isinstance(module, torch.nn.Linear) and is_lm:
            total += module.weight.numel()
    return total


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# -- 3. LoRA steps ---------------------------------------------------------------------------


def _optimizer(args: argparse.Namespace, peft_model: Any) -> tuple[Any, str]:
    """A DeepSpeed engine when wanted and deepspeed imports, else torch AdamW.

    ``auto`` wants DeepSpeed on CUDA only: on CPU its AdamW is a C++ op that DeepSpeed
    compiles on first use (two to three minutes on a 2-core machine) before the first step.
    """
    params = [p for p in peft_model.parameters() if p.requires_grad]
    on_cuda = str(args.device).startswith("cuda")
    if args.optimizer == "deepspeed" or (args.optimizer == "auto" and on_cuda):
        try:
            import deepspeed
        except ImportError:
            if args.optimizer == "deepspeed":
                raise
        else:
            for key, value in (
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29511"),
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("WORLD_SIZE", "1"),
            ):
                os.environ.setdefault(key, value)
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                "zero_optimization": {"stage": 0},
                "bf16": {"enabled": args.model_dtype == "bf16"},
            }
            engine, _, _, _ = deepspeed.initialize(
                model=peft_model, model_parameters=params, config=config
            )
            return engine, f"deepspeed {deepspeed.__version__}"
    return torch.optim.AdamW(params, lr=1e-4), "torch AdamW"


def lora_rows(
    args: argparse.Namespace, model: Any, processor: Any, image: Image.Image
) -> list[Row]:
    peft_model = attach_lora(model, dropout=0.0)
    peft_model.train()
    runner, how = _optimizer(args, peft_model)
    prompt = _prompt(QUESTION) + ANSWER + "</s>"
    batch = processor([prompt] * args.train_batch, [image] * args.train_batch)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    batch = {k: v.to(args.device) for k, v in batch.items()}
    labels = labels.to(args.device)
    is_engine = hasattr(runner, "backward") and hasattr(runner, "step")

    def step() -> tuple[float, int]:
        out = (runner if is_engine else peft_model)(**batch, labels=labels)
        if is_engine:
            runner.backward(out.loss)
            runner.step()
        else:
            out.loss.backward()
            runner.step()
            runner.zero_grad(set_to_none=True)
        return out.loss.item(), out.logits.shape[0] * out.logits.shape[1]

    step()  # warm-up: kernels, allocator
    sync(args.device)
    reset_peak(args.device)
    started = time.perf_counter()
    losses, tokens = [], 0
    for _ in range(args.train_steps):
        loss, n = step()
        losses.append(loss)
        tokens += n
    sync(args.device)
    elapsed = time.perf_counter() - started
    tokens_per_s = tokens / elapsed
    peak = peak_tflops(args)
    # Frozen base weights get no gradient: forward 2N + backward to activations 2N FLOPs per
    # token over the LM's Linear weights (attention scores and CLIP not counted: a lower bound).
    flops_per_token = 4 * lm_linear_parameters(model)
    mfu = f"{flops_per_token * tokens_per_s / (peak * 1e12):.1%}" if peak else "n/a"
    finite = all(math.isfinite(x) for x in losses)
    seq = tokens // (args.train_steps * args.train_batch)
    rows = [
        Row("lora train", f"{how}, batch {args.train_batch} x {seq} tokens",
            f"{tokens_per_s:,.0f} tokens/s; peak {peak_gib(args.device)}; MFU {mfu}", None),
        Row("lora loss", f"{args.train_steps} steps", " ".join(f"{x:.3f}" for x in losses), finite),
    ]  # fmt: skip
    peft_model.eval()
    return rows


def _prompt(question: str) -> str:
    from gpu_check_pulse import llava_v1_prompt

    return llava_v1_prompt(question)


# -- 4. generation ---------------------------------------------------------------------------


def generation_rows(
    args: argparse.Namespace, model: Any, processor: Any, image: Image.Image
) -> list[Row]:
    rows = []
    prompt = _prompt(QUESTION)

    def run(batch_size: int, new_tokens: int) -> float:
        batch = processor([prompt] * batch_size, [image] * batch_size)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        sync(args.device)
        started = time.perf_counter()
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
        sync(args.device)
        assert out.shape == (batch_size, new_tokens), tuple(out.shape)
        return time.perf_counter() - started

    run(1, 2)  # warm-up
    for batch_size in args.gen_batches:
        reset_peak(args.device)
        elapsed = run(batch_size, args.gen_tokens)
        rows.append(
            Row("generate", f"batch {batch_size}, {args.gen_tokens} new tokens",
                f"{batch_size / elapsed:.2f} ECGs/s; {batch_size * args.gen_tokens / elapsed:,.0f}"
                f" tokens/s; peak {peak_gib(args.device)}", None)
        )  # fmt: skip
    return rows


# -- 5. serving ------------------------------------------------------------------------------


def serving_rows(
    args: argparse.Namespace, model: Any, processor: Any, image: Image.Image
) -> list[Row]:
    from ecgvlm.infer import (
        OutOfMemory,
        batch_tokens,
        generate_batched,
        max_batch_tokens_for,
        memory_costs,
        prompt_tokens,
    )

    rows = []
    prompt = _prompt(QUESTION)
    batch = {k: v.to(args.device) for k, v in processor([prompt], [image]).items()}
    with torch.no_grad():
        before = model(**batch).logits[0, -1].float()
        model(**batch, output_hidden_states=True)
        after = model(**batch).logits[0, -1].float()
    diff = (after - before).abs().max().item()
    rows.append(Row("clip layer", "after a forward with output_hidden_states",
                    f"max |logit change| {diff:.1e}", diff == 0.0))  # fmt: skip

    costs = memory_costs(model)
    n_prompt = prompt_tokens(model, processor, [prompt], [image])[0]
    n_batch = 8
    prompts, images = [prompt] * n_batch, [image] * n_batch
    if not args.device.startswith("cuda"):
        out = generate_batched(model, processor, prompts[:3], images[:3], args.gen_tokens,
                               max_batch_tokens=2 * (n_prompt + args.gen_tokens))
        ok = not any(isinstance(g, OutOfMemory) for g in out)
        rows.append(Row("serve batching", "cpu: budget of 2 prompts, 3 prompts",
                        f"{len(out)} answers; no GPU memory to measure", ok))  # fmt: skip
        return rows
    torch.cuda.empty_cache()
    free_bytes, total_bytes = torch.cuda.mem_get_info()
    budget = max_batch_tokens_for(free_bytes, costs)
    per_request = batch_tokens([n_prompt], args.gen_tokens)
    rows.append(Row("serve budget", f"{free_bytes / 2**30:.1f} GiB free after the weights",
                    f"KV {costs.kv_bytes_per_token / 2**20:.2f} MiB/token; budget {budget:,} "
                    f"tokens = {budget // per_request} requests of {per_request:,}", None))  # fmt: skip
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = generate_batched(model, processor, prompts, images, args.gen_tokens,
                           max_batch_tokens=budget)
    grown = torch.cuda.max_memory_allocated() - baseline
    bound = batch_tokens([n_prompt] * n_batch, args.gen_tokens) * costs.bytes_per_token
    answered = sum(not isinstance(g, OutOfMemory) for g in out)
    rows.append(Row("serve peak", f"batch {n_batch} x {per_request:,} tokens",
                    f"{grown / 2**30:.2f} GiB over the weights; bound {bound / 2**30:.2f} GiB; "
                    f"{answered}/{n_batch} answered", answered == n_batch and grown <= bound))  # fmt: skip

    # Cap the process at what it holds plus half of one request's bound: every call must fail.
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_reserved() + per_request * costs.bytes_per_token // 2
    torch.cuda.set_per_process_memory_fraction(min(cap / total_bytes, 1.0))
    try:
        out = generate_batched(model, processor, prompts[:4], images[:4], args.gen_tokens,
                               max_batch_tokens=None)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    failed = sum(isinstance(g, OutOfMemory) for g in out)
    leaked = torch.cuda.memory_allocated() - baseline
    again = generate_batched(model, processor, prompts[:1], images[:1], 2)
    ok = failed == 4 and leaked <= 2**20 and not isinstance(again[0], OutOfMemory)
    rows.append(Row("serve out-of-memory", "capped at what is held + half a request",
                    f"{failed}/4 answered OutOfMemory (503); allocated vs baseline "
                    f"{leaked / 2**20:+.1f} MiB; next request answered", ok))  # fmt: skip
    return rows


# -- table and main --------------------------------------------------------------------------


def print_table(rows: list[Row], title: str) -> None:
    mark = {True: "pass", False: "FAIL", None: ""}
    table = [("check", "setting", "result", "")] + [
        (r.check, r.setting, r.result, mark[r.ok]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    print(title)
    for n, row in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint instead of 7B shape")
    parser.add_argument("--parity-dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--model-dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--optimizer", choices=("auto", "deepspeed", "adamw"), default="auto",
                        help="auto: DeepSpeed on CUDA when installed, torch AdamW otherwise")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--gen-batches", default="1,16")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU; else by GPU name")
    parser.add_argument("--golden", type=Path, default=REFERENCE_DIR / "golden_logits.npz")
    parser.add_argument("--parity-only", action="store_true", help="skip model, LoRA, generate")
    args = parser.parse_args(argv)
    if not args.device.startswith("cuda") and not args.tiny and not args.parity_only:
        # A PULSE-7B-shaped model in fp32 takes ~28 GB of host memory (it was OOM-killed at
        # 21 GB on a 24 GB machine): without a GPU only the tiny path is worth running.
        parser.error(
            f"no CUDA GPU here (device {args.device}): the 7B-shaped steps need one; "
            "run `scripts/gpu_acceptance.sh --device cpu --tiny` for the same steps on CPU"
        )
    args.model_dtype = args.model_dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    dtype_names = [d for d in args.parity_dtypes.split(",") if d]
    unknown = sorted(set(dtype_names) - set(DTYPES))
    if unknown:
        parser.error(f"--parity-dtypes: unknown {', '.join(unknown)}; use {', '.join(DTYPES)}")

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    title = f"PULSE acceptance on {device_name} (torch {torch.__version__})"
    rows: list[Row] = []
    errors = 0
    golden = np.load(args.golden)
    versions = json.loads(str(golden["versions"]))
    try:
        rows += parity_rows(args.device, dtype_names, golden)
    except Exception as e:  # noqa: BLE001 (reported in the table, which must still print)
        traceback.print_exc()
        rows.append(Row("parity", "", f"error: {type(e).__name__}: {e}", False))
    reference = (
        f"golden: transformers {versions.get('transformers')}, torch {versions.get('torch')}"
    )
    rows.append(Row("parity reference", "tests/reference", reference, None))
    with tempfile.TemporaryDirectory(prefix="pulse-accept-") as tmp:
        steps = ("build", "lora", "generate", "serving")
        if args.parity_only:
            steps = ()
        try:
            if not steps:
                raise StopIteration
            started = time.perf_counter()
            reset_peak(args.device)
            model, processor, what = build_model(args, Path(tmp))
            sync(args.device)
            n_params = sum(p.numel() for p in model.parameters())
            rows.append(
                Row("model", f"{what}, {args.model_dtype}",
                    f"{n_params / 1e6:,.1f} M params; built in {time.perf_counter() - started:.1f}"
                    f" s; {peak_gib(args.device)}", True)
            )  # fmt: skip
            steps = steps[1:]
            image, image_what = printout_image()
            rows.append(Row("image", image_what, f"{image.size[0]}x{image.size[1]} px; "
                            f"{model.num_image_features(image.size)} image features", None))  # fmt: skip
            rows += lora_rows(args, model, processor, image)
            steps = steps[1:]
            rows += generation_rows(args, model, processor, image)
            steps = steps[1:]
            rows += serving_rows(args, model, processor, image)
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001 (reported in the table, which must still print)
            traceback.print_exc()
            errors += 1
            rows.append(Row(steps[0], "", f"error: {type(e).__name__}: {e}"[:200], False))
    print_table(rows, title)
    parity_failed = any(r.ok is False for r in rows if r.check.startswith("parity"))
    other_failed = errors or any(r.ok is False for r in rows if not r.check.startswith("parity"))
    return 1 if parity_failed else 2 if other_failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput and where a step's time goes.

CPU (default): the real job (Ray Train, 2 CPU workers, DeepSpeed ZeRO-2 in fp32) on the tiny
PULSE checkpoint and a synthetic prepared data set; prints samples/s and the split of a step
into data (the wait for the next collated micro-batch, which a thread fetches, decodes and
processes while the current one trains, plus the copy to the device), forward, backward,
optimizer and communication (DeepSpeed's comms logger: time inside collectives, which happen
within backward/optimizer). CPU workers collate on the training thread unless
``--collate-ahead 1`` says otherwise; GPU runs collate one micro-batch ahead.

    python benchmarks/train_bench.py [--steps 30] [--batch 2] [--collate-ahead 1]

GPU (``--gpu``): one process on one GPU, DeepSpeed ZeRO-2 in bf16, a randomly initialised
model of PULSE-7B's exact shape (Llama-2-7B text model, CLIP ViT-L/14-336 tower, anyres
tiles; nothing is downloaded) with LoRA r=4 on q/k/v/o and gradient checkpointing (as
``configs/train_pulse_lora.yaml``; without it the default batch of 5-tile images needs
~117 GiB); prints the same split plus tokens/s, peak memory and MFU, then times one metric
all-reduce and one validation pass through the process group the job uses (NCCL only on
GPUs). Meant to finish in well under 8 minutes on one H100/H200.

    python benchmarks/train_bench.py --gpu [--steps 20] [--batch 4] [--no-checkpointing]

The GPU path has not been run on a GPU by its author (no GPU was available).

Collator only (``--collate-only``, CPU): PULSE-7B's collator on a micro-batch, then the wait
for each next one behind a sleep of ``--step-s`` standing in for the GPU's step, collated on
the training thread or one ahead (``--png``: a real printout in every row).

    python benchmarks/train_bench.py --collate-only [--png docs/images/cpsc2018_A0010_rbbb.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Peak dense bf16 throughput per GPU (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
# LLaVA-1.6 / PULSE-7B anyres grid (pixels).
PULSE_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"| {'-' * width} | ----- |"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _split_rows(m: dict[str, float]) -> list[tuple[str, str]]:
    step = m["time_step_s"]
    rows = [("samples/s (all workers)", f"{m['samples_per_s']:.2f}"),
            ("tokens/s (text, all workers)", f"{m['tokens_per_s']:.0f}"),
            ("step time (s)", f"{step:.4f}")]
    for phase in ("data", "forward", "backward", "optimizer", "comm"):
        v = m[f"time_{phase}_s"]
        rows.append((f"  {phase} (s, % of step)", f"{v:.4f} ({100 * v / step:.0f}%)"))
    return rows


def bench_cpu(args: argparse.Namespace) -> None:
    import ray

    from ecgvlm.config import load_config
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.train import HISTORY_NAME, TrainConfig, run_training
    from tests.unit.test_train import write_prepared

    tmp = Path(tempfile.mkdtemp(prefix="ecgvlm-train-bench-"))
    data = write_prepared(tmp / "data", {"train": 8, "val": 2}, image_px=(1100, 850))
    model = make_tiny_pulse(tmp / "tiny", seed=0)
    config = load_config(TrainConfig, REPO / "configs" / "train_tiny_cpu.yaml", [
        f"model_dir={model}", f"data_dir={data}", f"storage_path={tmp / 'runs'}",
        f"output_dir={tmp / 'adapter'}", f"max_steps={args.steps}",
        f"eval_every_steps={args.steps}", f"log_every_steps={args.log_every}",
        f"per_device_batch_size={args.batch}", "global_batch_size=null",
        "train_repeat=64", "profile_comm=true", "eval_max_samples=2",
        f"deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero2.json'}",
    ] + ([] if args.collate_ahead is None else [f"collate_ahead={args.collate_ahead}"]))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    started = time.perf_counter()
    run_training(config)
    wall = time.perf_counter() - started
    ray.shutdown()
    import json

    history = [json.loads(x) for x in (Path(config.run_dir()) / HISTORY_NAME).read_text().splitlines()]
    # The first window includes warm-up (first batches, allocator); report the later ones.
    windows = [h for h in history if h["step"] > args.log_every and "val_loss" not in h] or history
    mean = {k: sum(h[k] for h in windows) / len(windows) for k in windows[0]
            if k.startswith(("time_", "samples_", "tokens_"))}
    print(f"\ntrain_bench CPU: tiny PULSE, 2 CPU workers, ZeRO-2 fp32, per-device batch "
          f"{args.batch}, images 1100x850, collated ahead {args.collate_ahead or 0}, "
          f"steps {args.steps} (mean of "
          f"{len(windows)} windows of {args.log_every} steps after the first)")
    print(_table(_split_rows(mean) + [("job wall time incl. start-up (s)", f"{wall:.1f}")]))


def _pulse7b_config() -> dict:
    from ecgvlm.model.tiny import tiny_config

    config = tiny_config(32000, "flat")
    config.update(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        mm_hidden_size=1024, mm_vision_tower="openai/clip-vit-large-patch14-336",
        image_grid_pinpoints=PULSE_PINPOINTS, torch_dtype="bfloat16",
    )
    return config


def reduce_and_validate(
    engine, collator, rows: list[dict], config, device, dtype
) -> dict[str, float]:
    """One metric all-reduce and one validation pass, as the job makes at its first logged
    step and its first evaluation, through the group the job's loop reduces over."""
    from ecgvlm.train import evaluate
    from ecgvlm.train.loop import _mean_across_ranks, _metric_group

    group = _metric_group()
    t0 = time.perf_counter()
    _mean_across_ranks([1.0, 2.0], group)
    t1 = time.perf_counter()
    metrics = evaluate(engine, collator, rows, config, device, dtype, group=group)
    t2 = time.perf_counter()
    return {"allreduce_s": t1 - t0, "validation_s": t2 - t1, **metrics}


def _pulse7b_batch(tmp: Path, batch_size: int) -> tuple[Any, dict[str, list], list[dict]]:
    """PULSE-7B's collator (its image settings, anyres grid and right padding) and a
    micro-batch of ``batch_size`` rows with 1100x850 printouts, and those rows."""
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.model.processor import (
        ImagePreprocessConfig,
        LlamaSentencePieceTokenizer,
        PulseImageProcessor,
        PulseProcessor,
    )
    from ecgvlm.train import REQUIRED_COLUMNS, Collator
    from tests.unit.test_train import tiny_rows

    # The tokenizer only has to produce valid ids: the tiny checkpoint's (<32000 pieces).
    tokenizer = LlamaSentencePieceTokenizer(make_tiny_pulse(tmp / "tiny", seed=0))
    processor = PulseProcessor(
        tokenizer, PulseImageProcessor(ImagePreprocessConfig(336, 336), PULSE_PINPOINTS),
        padding_side="right",
    )
    rows = tiny_rows("train", batch_size, image_px=(1100, 850))
    return Collator(processor), {k: [r[k] for r in rows] for k in REQUIRED_COLUMNS}, rows


def bench_collate(args: argparse.Namespace) -> None:
    """The collator at PULSE-7B's settings on this CPU, and the wait for it at each step when
    it runs on the training thread or a thread ahead of it. A sleep of ``--step-s`` stands in
    for the GPU's step (a wait that holds no CPU, as a CUDA synchronisation is)."""
    from ecgvlm.train import collated_ahead

    tmp = Path(tempfile.mkdtemp(prefix="ecgvlm-train-bench-collate-"))
    collator, batch, _ = _pulse7b_batch(tmp, args.batch)
    if args.png:
        # A real printout in every row, in place of the tests' drawing of one trace.
        batch["png"] = [Path(args.png).read_bytes()] * args.batch
    alone = []
    for _ in range(args.steps + 2):
        t0 = time.perf_counter()
        collator(batch)
        alone.append(time.perf_counter() - t0)
    rows = [(f"collate one micro-batch, p50 of {args.steps} (ms)",
             f"{1000 * statistics.median(alone[2:]):.1f}")]
    for ahead in (0, args.collate_ahead or 1):
        waits = []
        started = time.perf_counter()
        fed = collated_ahead(((i, batch) for i in range(args.steps + 1)), collator, ahead)
        next(fed)  # the first batch is collated before any step, either way
        for _ in range(args.steps):
            time.sleep(args.step_s)
            t0 = time.perf_counter()
            next(fed)
            waits.append(time.perf_counter() - t0)
        total = time.perf_counter() - started
        rows.append((f"collated ahead {ahead}: wait for the next batch, p50 (ms)",
                     f"{1000 * statistics.median(waits):.1f}"))
        rows.append((f"collated ahead {ahead}: {args.steps} steps (s)", f"{total:.2f}"))
    image = args.png or "1100x850 drawings of one trace"
    print(f"\ntrain_bench collate: PULSE-7B's collator (336 px tiles, anyres grid), batch "
          f"{args.batch}, images {image}, a {args.step_s} s sleep as each step")
    print(_table(rows))


def timed_steps(
    engine: Any, collator: Any, batch: dict[str, list], device: Any, dtype: Any,
    args: argparse.Namespace,
) -> Any:
    """``args.steps`` training steps on ``batch``, timed by phase after ``args.warmup`` of them.

    As the job does, the next micro-batch is collated on a thread (``args.collate_ahead``)
    while this one trains, so ``data`` is the wait for it plus the copy to the device.
    """
    from ecgvlm.train import collated_ahead, train_step
    from ecgvlm.train.loop import _StepTimes

    times = _StepTimes()
    steps = ((step, batch) for step in range(args.steps))
    fed = collated_ahead(steps, collator, args.collate_ahead)
    while True:
        t0 = time.perf_counter()
        item = next(fed, None)
        if item is None:
            return times
        step, inputs = item
        if step == args.warmup:
            times.reset()
        times.seconds["data"] += time.perf_counter() - t0
        train_step(engine, inputs, device, dtype, times)


def bench_gpu(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    from transformers import CLIPVisionConfig, get_cosine_schedule_with_warmup

    from ecgvlm.model.checkpoint import KNOWN_VISION_TOWERS
    from ecgvlm.model.lora import attach_lora
    from ecgvlm.model.pulse import build_pulse
    from ecgvlm.train import TrainConfig, load_deepspeed_config, resolve_deepspeed_config
    from ecgvlm.train.loop import _comm_ms_total

    os.environ["DS_ACCELERATOR"] = "cuda"
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0",
                 "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl")
    device = torch.device("cuda", 0)
    gpu_name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)

    started = time.perf_counter()
    model = build_pulse(_pulse7b_config(), CLIPVisionConfig(**KNOWN_VISION_TOWERS[
        "openai/clip-vit-large-patch14-336"]), dtype=torch.bfloat16, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="ecgvlm-train-bench-gpu-"))
    collator, batch, rows = _pulse7b_batch(tmp, args.batch)
    config = TrainConfig(model_dir="random-pulse-7b-shape", data_dir=str(tmp),
                         num_workers=1, use_gpu=True, per_device_batch_size=args.batch,
                         max_steps=args.steps, gradient_checkpointing=args.checkpointing,
                         profile_comm=True)
    model = attach_lora(model, r=4, alpha=8, dropout=0.05, bias="lora_only")
    if args.checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, args.steps)
    ds = resolve_deepspeed_config(
        load_deepspeed_config(REPO / "configs" / "deepspeed" / "zero2.json"), config, use_gpu=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds)
    setup_s = time.perf_counter() - started

    base = engine.module.get_base_model()
    tokens_per_batch = sum(
        int(m.sum()) - 1 + base.num_image_features((int(w), int(h)))
        for m, (w, h) in zip(collator(batch)["attention_mask"], collator(batch)["image_sizes"])
    )
    torch.cuda.reset_peak_memory_stats(device)
    m = timed_steps(engine, collator, batch, device, torch.bfloat16, args).metrics()
    m["time_comm_s"] = _comm_ms_total() / 1000.0 / args.steps
    checks = reduce_and_validate(engine, collator, rows[:2], config, device, torch.bfloat16)
    merged_tokens_per_s = tokens_per_batch / m["time_step_s"]
    # LoRA: forward 2N and backward 2N FLOPs per token (no weight gradients for frozen
    # weights), + 2N when activations are recomputed; attention's quadratic term ignored.
    flops_per_token = (6 if args.checkpointing else 4) * n_params
    mfu = merged_tokens_per_s * flops_per_token / peak if peak else float("nan")
    print(f"\ntrain_bench GPU: {gpu_name}, random PULSE-7B shape ({n_params / 1e9:.2f} B params), "
          f"LoRA r=4 q/k/v/o, ZeRO-2 bf16, batch {args.batch}, images 1100x850 (anyres), "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'}, "
          f"collated ahead {args.collate_ahead}, "
          f"{args.steps - args.warmup} timed steps after {args.warmup} warm-up")
    print(_table(_split_rows(m) + [
        ("tokens/s incl. image tokens", f"{merged_tokens_per_s:.0f}"),
        ("tokens per batch (merged)", f"{tokens_per_batch}"),
        ("peak memory (GiB)", f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"),
        ("MFU", f"{100 * mfu:.1f}%" if peak else "unknown GPU peak"),
        ("model build + DeepSpeed init (s)", f"{setup_s:.1f}"),
        ("metric all-reduce (s)", f"{checks['allreduce_s']:.4f}"),
        (f"validation pass, {checks['val_samples']} samples (s)", f"{checks['validation_s']:.2f}"),
    ]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="PULSE-7B shape on one GPU")
    parser.add_argument("--collate-only", action="store_true",
                        help="PULSE-7B's collator on the CPU, on the training thread or ahead")
    parser.add_argument("--step-s", type=float, default=1.0,
                        help="collate-only: seconds each simulated GPU step sleeps")
    parser.add_argument("--png", default=None,
                        help="collate-only: a printout to put in every row (default: the "
                             "tests' 1100x850 drawing of one trace)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3, help="GPU: untimed first steps")
    parser.add_argument("--collate-ahead", type=int, default=None,
                        help="micro-batches collated on a thread while one trains (0: none; "
                             "default: the job's, 1 on a GPU and 0 on CPUs)")
    parser.add_argument("--log-every", type=int, default=5, help="CPU: steps per timing window")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="GPU: gradient checkpointing (on by default, as in the GPU config)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.gpu:
        args.steps = args.steps or 20
        args.batch = args.batch or 4
        args.collate_ahead = 1 if args.collate_ahead is None else args.collate_ahead
        bench_gpu(args)
    elif args.collate_only:
        args.steps = args.steps or 10
        args.batch = args.batch or 4
        bench_collate(args)
    else:
        args.steps = args.steps or 30
        args.batch = args.batch or 2
        bench_cpu(args)


if __name__ == "__main__":
    main()

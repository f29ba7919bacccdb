"""Throughput and latency of the endpoint on the tiny PULSE checkpoint, batching on and off.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_bench.py [--requests 64] [--max-tokens 4]

For each batching setting the app is deployed on a local Ray, warmed up, and driven by an
asyncio client at concurrency 1, 8 and 32 with the same chat request (one small PNG, greedy,
``--max-tokens`` new tokens). Serve's overhead is the endpoint's p50 latency at concurrency 1
minus the p50 of the same ``PulseRunner.generate`` call made in this process. Targets
(issue 7): batching >= 3x throughput at concurrency 32; overhead p50 <= 10 ms.

Numbers on a shared 2-core machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONCURRENCY = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _image_png(size: tuple[int, int]) -> bytes:
    """A small printout-like PNG (one anyres tile keeps the tiny model's work small)."""
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for x in range(0, size[0], 8):
        draw.line([(x, 0), (x, size[1])], fill=(255, 200, 200))
    draw.line([(0, size[1] // 2), (size[0], size[1] // 3)], fill="black", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def _drive(url: str, body: dict, concurrency: int, n_requests: int) -> tuple[float, list[float]]:
    """Send ``n_requests`` with ``concurrency`` in flight; return (wall seconds, latencies)."""
    import aiohttp

    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            async with session.post(url, json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            latencies.append(time.perf_counter() - t0)

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - t0, latencies


def _direct_p50_ms(model_dir: Path, png: bytes, prompt: str, max_tokens: int, n: int) -> float:
    import torch

    from ecgvlm import serving as sv

    # A Serve replica with num_cpus=1 runs torch on one thread (Ray sets OMP_NUM_THREADS to
    # the replica's CPUs); the direct call does the same, so only Serve's work differs.
    torch.set_num_threads(1)
    runner = sv.PulseRunner(str(model_dir), {}, device="cpu")
    req = sv.GenerateRequest(prompt=prompt, image=png, max_new_tokens=max_tokens)
    runner.generate([req])  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner.generate([req])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64, help="requests per level (>= c)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--direct-calls", type=int, default=20)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from ecgvlm import serving as sv
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.prompt import prompt_from_messages
    from serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = make_tiny_pulse(tmp / "tiny-pulse", seed=0)
    png = _image_png((336, 168))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sv.image_data_url(png)}},
        {"type": "text", "text": "Which rhythm does this ECG show?"}]}]
    body = {"model": "pulse", "messages": messages, "max_tokens": args.max_tokens,
            "temperature": 0}
    prompt, _ = prompt_from_messages(messages)

    direct_ms = _direct_p50_ms(model_dir, png, prompt, args.max_tokens, args.direct_calls)

    os.environ.pop("OPENAI_API_KEY", None)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows = []
    try:
        for label, batch in (("off", 1), ("on", args.max_batch_size)):
            app = build_app({
                "model_dir": str(model_dir), "device": "cpu",
                "batching": {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait_s},
                "pulse": {"num_cpus": 1, "max_ongoing_requests": 128},
                "gateway": {"num_cpus": 0.5, "max_ongoing_requests": 256},
                "proxy": {"num_cpus": 0.1},
            })
            serve.run(app, name="bench", route_prefix="/")
            asyncio.run(_drive(url, body, 4, 8))  # warm-up: imports, first batch
            for c in CONCURRENCY:
                n = max(args.requests, c)
                wall_s, lat = asyncio.run(_drive(url, body, c, n))
                rows.append((label, c, n, n / wall_s, statistics.median(lat) * 1000,
                             _percentile(lat, 99) * 1000))
                print(f"  batching {label:3s} c={c:<2d} {n / wall_s:7.2f} req/s", flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()

    print()
    print(f"tiny PULSE, {args.max_tokens} new tokens, 336x168 PNG, max_batch_size "
          f"{args.max_batch_size}, batch_wait {args.batch_wait_s:g} s, {os.cpu_count()} cores")
    print("| batching | concurrency | requests | req/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, c, n, rps, p50, p99 in rows:
        print(f"| {label} | {c} | {n} | {rps:.2f} | {p50:.1f} | {p99:.1f} |")
    rps = {(label, c): r for label, c, _, r, _, _ in rows}
    p50_c1_off = next(p50 for label, c, _, _, p50, _ in rows if label == "off" and c == 1)
    speedup = rps[("on", 32)] / rps[("off", 32)]
    overhead = p50_c1_off - direct_ms
    print()
    print(f"batching speed-up at concurrency 32: {speedup:.2f}x (target >= 3x: "
          f"{'met' if speedup >= 3 else 'NOT met'})")
    print(f"direct PulseRunner.generate p50: {direct_ms:.1f} ms; endpoint p50 at c=1 "
          f"(batching off): {p50_c1_off:.1f} ms; Serve overhead p50: {overhead:.1f} ms "
          f"(target <= 10 ms: {'met' if overhead <= 10 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

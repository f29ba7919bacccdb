"""Sustained load, overload and recovery of the endpoint on the tiny PULSE checkpoint.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/load.py [--clients 32] [--duration-s 60]
        [--overload-clients 256] [--overload-s 20] [--recovery-s 20]

The app is deployed on a local Ray with serve/config.yaml's replica settings (PULSE: 64
ongoing requests per replica, 64 more queued at the gateway, then 503 with Retry-After) and
one adapter. Closed-loop clients (each sends its next request when the last is answered)
cycle through ``pulse`` and ``pulse-lora`` chat requests with a printout and
``/v1/ecg/interpret`` with a 10 s 12-lead signal. Three phases:

1. steady: ``--clients`` for ``--duration-s``; target 0 errors.
2. overload: ``--overload-clients``; the endpoint sheds what it cannot hold with 503 and
   ``Retry-After`` (shed clients wait that long, as a well-behaved client does) and answers
   every request within its 60 s time-out.
3. recovery: back to ``--clients``; target 0 errors again.

Prints one row per phase: requests, answers by status, p50/p99 of the answered ones, the
slowest, time-outs and whether every 503 carried Retry-After. Run it on a quiet machine and
compare phases within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECORD = REPO / "data" / "samples" / "cpsc2018" / "A0002"
REQUEST_TIMEOUT_S = 60.0
OPTIONS = ["Atrial fibrillation", "Normal sinus rhythm", "Left bundle branch block"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _bodies() -> list[tuple[str, dict]]:
    """(path, JSON body) of the three request kinds the clients cycle through."""
    from ecgvlm import serving as sv
    from ecgvlm.signal import read_record

    record = read_record(RECORD)
    png_url = sv.image_data_url(sv.render_png(record))
    chat = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url}},
        {"type": "text", "text": "Which rhythm does this ECG show?"}]}]
    interpret = {"samples": record.signal_mv.round(4).tolist(), "fs_hz": record.fs_hz,
                 "leads": list(record.leads), "options": OPTIONS, "max_tokens": 16,
                 "return_measurements": False}
    return [("/v1/chat/completions", {"model": "pulse", "messages": chat, "max_tokens": 16}),
            ("/v1/chat/completions", {"model": "pulse-lora", "messages": chat,
                                      "max_tokens": 16}),
            ("/v1/ecg/interpret", interpret)]


async def _phase(base: str, bodies: list[tuple[str, dict]], clients: int,
                 duration_s: float) -> dict:
    import aiohttp

    statuses: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    slowest = 0.0
    timeouts = 0
    missing_retry_after = 0
    deadline = time.monotonic() + duration_s

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal slowest, timeouts, missing_retry_after
        k = i
        while time.monotonic() < deadline:
            path, body = bodies[k % len(bodies)]
            k += 1
            t0 = time.monotonic()
            try:
                async with session.post(base + path, json=body) as resp:
                    await resp.read()
                    status, retry_after = resp.status, resp.headers.get("Retry-After")
            except asyncio.TimeoutError:
                timeouts += 1
                continue
            seconds = time.monotonic() - t0
            slowest = max(slowest, seconds)
            statuses[status] += 1
            if status == 200:
                latencies.append(seconds)
            elif status in (429, 503):
                if retry_after is None:
                    missing_retry_after += 1
                await asyncio.sleep(float(retry_after or 1))

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return {"statuses": statuses, "p50": _percentile(latencies, 50),
            "p99": _percentile(latencies, 99), "slowest": slowest, "timeouts": timeouts,
            "missing_retry_after": missing_retry_after, "answered": len(latencies)}


def _serve_args(model_dir: Path, adapter: Path) -> dict:
    """serve/config.yaml's args with this run's model, adapter and CPU-sized replicas."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    args = config["applications"][0]["args"]
    args.update({"model_dir": str(model_dir), "adapters": {"demo": str(adapter)},
                 "device": "cpu", "report_dir": None})
    args["pulse"].update({"num_cpus": 1, "num_gpus": 0})
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--overload-clients", type=int, default=256)
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--recovery-s", type=float, default=20.0)
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from ecgvlm.model import attach_lora, load_pulse, make_tiny_pulse, save_adapter
    from serve.app import build_app

    tmp = Path(tempfile.mkdtemp(prefix="load-bench-"))
    model_dir = make_tiny_pulse(tmp / "tiny-pulse", seed=0)
    adapter = save_adapter(attach_lora(load_pulse(model_dir)[0]), tmp / "adapter")
    bodies = _bodies()
    os.environ.pop("OPENAI_API_KEY", None)
    os.environ.pop("ECGVLM_API_TOKEN", None)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    serve_args = _serve_args(model_dir, adapter)
    rows = []
    try:
        serve.run(build_app(serve_args), name="load", route_prefix="/")
        asyncio.run(_phase(base, bodies, 3, 5.0))  # warm-up: imports, first batches
        for name, clients, seconds in (("steady", args.clients, args.duration_s),
                                       ("overload", args.overload_clients, args.overload_s),
                                       ("recovery", args.clients, args.recovery_s)):
            started = time.monotonic()
            out = asyncio.run(_phase(base, bodies, clients, seconds))
            rows.append((name, clients, time.monotonic() - started, out))
            print(f"  {name}: {dict(out['statuses'])}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    pulse = serve_args["pulse"]
    print()
    print(f"tiny PULSE on CPU; pulse max_ongoing_requests {pulse['max_ongoing_requests']}, "
          f"max_queued_requests {pulse['max_queued_requests']}, retry_after_s "
          f"{pulse['retry_after_s']}; requests cycle pulse / pulse-lora chat (16 tokens) and "
          f"/v1/ecg/interpret; {os.cpu_count()} cores")
    print("| phase | clients | seconds | answered (200) | shed (503/429) | other | time-outs "
          "| p50 s | p99 s | slowest s | 503 without Retry-After |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, clients, seconds, out in rows:
        st = out["statuses"]
        shed = st[503] + st[429]
        other = sum(st.values()) - st[200] - shed
        print(f"| {name} | {clients} | {seconds:.0f} | {st[200]} | {shed} | {other} | "
              f"{out['timeouts']} | {out['p50']:.2f} | {out['p99']:.2f} | {out['slowest']:.1f} "
              f"| {out['missing_retry_after']} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    steady, overload, recovery = (r[3] for r in rows)
    problems = []
    for name, out in (("steady", steady), ("recovery", recovery)):
        if set(out["statuses"]) - {200} or out["timeouts"]:
            problems.append(f"{name} had errors: {dict(out['statuses'])}, "
                            f"{out['timeouts']} time-outs")
    if set(overload["statuses"]) - {200, 429, 503} or overload["timeouts"]:
        problems.append(f"overload answered other than 200/429/503 or timed out: "
                        f"{dict(overload['statuses'])}, {overload['timeouts']} time-outs")
    if overload["missing_retry_after"]:
        problems.append(f"{overload['missing_retry_after']} shed answers had no Retry-After")
    for p in problems:
        print("NOT met:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

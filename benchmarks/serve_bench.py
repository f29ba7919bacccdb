"""Throughput and latency of the endpoint on the tiny PULSE checkpoint, batching on and off.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/serve_bench.py [--requests 64] [--max-tokens 4]
        [--kinds generate,generate-1,choice] [--overhead-only] [--ingress haproxy]
        [--model-dir DIR --device cuda --png PRINTOUT.png --direct-calls 0]   (on a GPU)

For each batching setting the app is deployed on a local Ray, warmed up, and driven by an
asyncio client at concurrency 1, 8 and 32 with one kind of chat request at a time (one small
PNG, greedy): ``generate`` (``--max-tokens`` new tokens), ``generate-1`` (one new token) and
``choice`` (``guided_choice`` over four letters with ``logprobs``). Serve's overhead is the
endpoint's p50 latency at concurrency 1 minus the p50 of the same ``PulseRunner.generate``
call made in this process, split by hop with each answer's ``Server-Timing`` header
(``--overhead-only`` measures only that). On Linux a table gives the CPU time each kind of
process spent per request of the generation levels (``/proc``). ``--ingress haproxy`` puts
HAProxy in front of the gateway replica instead of Serve's HTTP proxy, as ``ecgvlm serve
--ingress haproxy`` does. Targets: batching >= 3x throughput at concurrency 32 and overhead
p50 <= 10 ms (issue 7); a constrained choice costs no more than a 1-token generation
(issue 16).

Numbers on a shared 2-core machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ecgvlm.local_ray import INGRESSES, haproxy_ingress_env

CONCURRENCY = (1, 8, 32)
#: Request kinds: the extra fields of each one's body (``generate``: ``--max-tokens``).
KINDS = {
    "generate": {},
    "generate-1": {"max_tokens": 1},
    "choice": {"guided_choice": ["A", "B", "C", "D"], "logprobs": True},
}


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


#: What a process is, by a marker in its command line (Ray's workers name their actor there).
PROCESS_GROUPS = (
    ("PulseModel", "model replica"),
    ("Gateway", "gateway replica"),
    ("ProxyActor", "Serve's HTTP proxy"),
    ("haproxy", "HAProxy"),
    ("ServeController", "Serve's controller"),
    ("ray", "Ray's other processes (raylet, GCS, idle workers)"),
)


def _cpu_snapshot() -> dict[object, tuple[str, float]]:
    """Each process's kind and the CPU seconds (user + system) it has used so far, and the
    machine's busy and total CPU seconds (``/proc``; Linux only, else empty)."""
    if not Path("/proc/stat").exists():
        return {}
    tick_hz = os.sysconf("SC_CLK_TCK")
    snapshot: dict[object, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:  # it exited meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # the name may hold spaces
        cpu_s = (int(fields[11]) + int(fields[12])) / tick_hz  # utime, stime
        if int(entry.name) == os.getpid():
            group = "benchmark (the client)"
        else:
            group = next((name for marker, name in PROCESS_GROUPS if marker in cmdline),
                         "everything else")
        snapshot[int(entry.name)] = (group, cpu_s)
    jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle, iowait
    snapshot["busy"] = ("(machine busy)", (sum(jiffies) - idle) / tick_hz)
    snapshot["total"] = ("(machine total)", sum(jiffies) / tick_hz)
    return snapshot


def _cpu_used(before: dict[object, tuple[str, float]],
              after: dict[object, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two snapshots, by kind of process. A process that exited in
    between is left out (its last seconds are unknown); one that started counts whole."""
    used: dict[str, float] = {}
    for key, (group, cpu_s) in after.items():
        used[group] = used.get(group, 0.0) + cpu_s - before.get(key, (group, 0.0))[1]
    return used


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def _drive(
    url: str, body: dict, concurrency: int, n_requests: int
) -> tuple[float, list[float]]:
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


def _direct_runner(model_dir: Path, device: str, dtype: str):
    import torch

    from ecgvlm import serving as sv

    if device == "cpu":
        # A Serve replica with num_cpus=1 runs torch on one thread (Ray sets OMP_NUM_THREADS
        # to the replica's CPUs); the direct call does the same, so only Serve's work differs.
        torch.set_num_threads(1)
    return sv.PulseRunner(str(model_dir), {}, dtype=dtype, device=device)


def _overhead_pairs(runner, url: str, body: dict, png: bytes, prompt: str, max_tokens: int,
                    n: int) -> tuple[list[float], list[float], list[float], list[dict[str, float]]]:
    """Alternate a direct ``generate``, one endpoint request and a /healthz (ms), ``n`` times;
    also each request's ``Server-Timing`` (where the gateway and the replica spent it).

    Alternating puts both under the same machine load, which on a shared box drifts by more
    than the overhead being measured.
    """
    import requests

    from ecgvlm import serving as sv

    req = sv.GenerateRequest(prompt=prompt, image=png, max_new_tokens=max_tokens)
    direct, endpoint, health, timings = [], [], [], []
    health_url = url.replace("/v1/chat/completions", "/healthz")
    with requests.Session() as http:
        for _ in range(n):
            t0 = time.perf_counter()
            runner.generate([req])
            direct.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            reply = http.post(url, json=body, timeout=600)
            reply.raise_for_status()
            endpoint.append((time.perf_counter() - t0) * 1000)
            timings.append(sv.parse_server_timing(reply.headers.get("server-timing", "")))
            t0 = time.perf_counter()
            http.get(health_url, timeout=600).raise_for_status()
            health.append((time.perf_counter() - t0) * 1000)
    return direct, endpoint, health, timings


def hop_table(endpoint: list[float], timings: list[dict[str, float]]) -> list[tuple[str, float]]:
    """p50 ms of each hop of a request, from the client's time and the endpoint's
    ``Server-Timing``: what is left of the client's time outside the gateway is the ingress
    (Serve's HTTP proxy or HAProxy) and the loopback network; what is left of the gateway's
    call outside the replica's adapter, image, queue and model time is the handle call
    (routing, serialisation, the actor hop both ways)."""
    med = statistics.median
    hops = [
        ("ingress + network (client - gateway total)",
         med(e - t["total"] for e, t in zip(endpoint, timings))),
        ("gateway: read the body (from Serve's proxy: a call back to it) + validate",
         med(t["parse"] for t in timings)),
        ("gateway: decode the image", med(t["decode"] for t in timings)),
        ("gateway: build the prompt", med(t["prompt"] for t in timings)),
        ("handle call to the model replica (call - adapter - image - queue - model)",
         med(t["call"] - t["adapter"] - t["image"] - t["queue"] - t["model"] for t in timings)),
        ("replica: prepare the image (its own thread)", med(t["image"] for t in timings)),
        ("replica: batch queue", med(t["queue"] for t in timings)),
        ("replica: model (generate in a thread)", med(t["model"] for t in timings)),
        ("gateway: the rest (response JSON)",
         med(t["total"] - t["parse"] - t["decode"] - t["prompt"] - t["call"] for t in timings)),
    ]
    return [*hops, ("client total", med(endpoint))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per level (>= c)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--direct-calls", type=int, default=30, help="overhead pairs")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a PULSE checkpoint (default: a tiny random one made here)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--png", type=Path, default=None,
                        help="the printout every request sends (default: a small synthetic "
                             "one; give a real 1181x591 printout for a GPU run)")
    parser.add_argument("--ingress", choices=INGRESSES, default="proxy",
                        help="what answers HTTP: Serve's proxy or HAProxy (as ecgvlm serve)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the overhead pairs and the hop table (no throughput sweep)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated request kinds, of {', '.join(KINDS)} "
                             "(generate always runs)")
    args = parser.parse_args(argv)
    if args.overhead_only and args.direct_calls <= 0:
        parser.error("--overhead-only measures the direct calls: give --direct-calls > 0")
    unknown = sorted(set(args.kinds.split(",")) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    # The generation rows give the batching speed-up: always run.
    kinds = ["generate"] + [k for k in KINDS if k != "generate" and k in args.kinds.split(",")]

    import ray
    from ray import serve

    from ecgvlm import serving as sv
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.prompt import prompt_from_messages
    from serve.app import build_app

    if args.model_dir is None:
        model_dir = make_tiny_pulse(Path(tempfile.mkdtemp(prefix="serve-bench-")) / "tiny-pulse",
                                    seed=0)
    else:
        model_dir = args.model_dir.resolve()
    png = args.png.read_bytes() if args.png is not None else _image_png((336, 168))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sv.image_data_url(png)}},
        {"type": "text", "text": "Which rhythm does this ECG show?"}]}]
    body = {"model": "pulse", "messages": messages, "max_tokens": args.max_tokens,
            "temperature": 0}
    prompt, _ = prompt_from_messages(messages)

    # The direct calls load a second copy of the model in this process: --direct-calls 0
    # on a GPU that cannot hold two (no overhead or hop table then).
    runner = None
    if args.direct_calls > 0:
        runner = _direct_runner(model_dir, args.device, args.dtype)
        runner.generate([sv.GenerateRequest(prompt=prompt, image=png, max_new_tokens=2)])  # warm

    os.environ.pop("OPENAI_API_KEY", None)
    haproxy_dir = None
    if args.ingress == "haproxy":  # before Ray starts: its Serve processes read them
        # A short path: HAProxy's admin socket goes under it, in 97 bytes at most.
        haproxy_dir = tempfile.mkdtemp(prefix="sb-", dir="/tmp")
        os.environ.update(haproxy_ingress_env(haproxy_dir))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows = []
    cpu: dict[tuple[str, int], tuple[dict[str, float], int]] = {}
    try:
        settings = (("off", 1),) if args.overhead_only else (("off", 1), ("on", args.max_batch_size))
        for label, batch in settings:
            app = build_app({
                "model_dir": str(model_dir), "device": args.device, "dtype": args.dtype,
                "batching": {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait_s},
                "pulse": {"num_cpus": 1, "max_ongoing_requests": 128},
                "gateway": {"num_cpus": 0.5, "max_ongoing_requests": 256},
                "proxy": {"num_cpus": 0.1},
            })
            serve.run(app, name="bench", route_prefix="/")
            asyncio.run(_drive(url, body, 4, 8))  # warm-up: imports, first batch
            if batch == 1 and runner is not None:
                direct, endpoint, health, timings = _overhead_pairs(
                    runner, url, body, png, prompt, args.max_tokens, args.direct_calls)
            pulse = serve.get_deployment_handle("PulseModel", app_name="bench")
            for kind in [] if args.overhead_only else kinds:
                kind_body = {**body, **KINDS[kind]}
                for c in CONCURRENCY:
                    n = max(args.requests, c)
                    before = pulse.stats.remote().result()
                    cpu_before = _cpu_snapshot()
                    wall_s, lat = asyncio.run(_drive(url, kind_body, c, n))
                    cpu_after = _cpu_snapshot()
                    after = pulse.stats.remote().result()
                    if kind == "generate" and cpu_before:
                        cpu[(label, c)] = (_cpu_used(cpu_before, cpu_after), n)
                    # The replica's own count: how many requests its batches really held.
                    mean_batch = ((after["batched_requests"] - before["batched_requests"])
                                  / max(after["batches"] - before["batches"], 1))
                    rows.append((kind, label, c, n, n / wall_s, statistics.median(lat) * 1000,
                                 _percentile(lat, 99) * 1000, mean_batch))
                    print(f"  {kind:10s} batching {label:3s} c={c:<2d} {n / wall_s:7.2f} req/s",
                          flush=True)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        if haproxy_dir is not None:
            shutil.rmtree(haproxy_dir, ignore_errors=True)
        if args.model_dir is None:  # the tiny model made above (each run left one in /tmp)
            shutil.rmtree(model_dir.parent, ignore_errors=True)

    if rows:
        _print_throughput(rows, kinds, args, model_dir)
    if cpu:
        _print_cpu(cpu)
    if runner is not None:
        _print_overhead(direct, endpoint, health, timings, args.ingress)
    return 0


def _print_throughput(rows: list[tuple], kinds: list[str], args: argparse.Namespace,
                      model_dir: Path) -> None:
    model = "tiny PULSE" if args.model_dir is None else str(model_dir)
    image = "336x168 synthetic PNG" if args.png is None else str(args.png)
    print()
    print(f"{model} on {args.device} ({args.dtype}), {args.max_tokens} new tokens, {image}, "
          f"max_batch_size {args.max_batch_size}, batch_wait {args.batch_wait_s:g} s, "
          f"ingress {args.ingress}, "
          f"{os.cpu_count()} cores")
    names = {"generate": f"generate {args.max_tokens} tokens", "generate-1": "generate 1 token",
             "choice": "choice (4 letters)"}
    print("| request | batching | concurrency | requests | req/s | ECGs/hour | p50 ms | p99 ms "
          "| mean batch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, label, c, n, rps, p50, p99, batch in sorted(rows, key=lambda r: (r[1], r[2])):
        print(f"| {names[kind]} | {label} | {c} | {n} | {rps:.2f} | {rps * 3600:,.0f} | "
              f"{p50:.1f} | {p99:.1f} | {batch:.1f} |")
    p50s = {(kind, label, c): p50 for kind, label, c, _, _, p50, _, _ in rows}
    if "choice" in kinds and "generate-1" in kinds:
        ratios = ", ".join(
            f"{label} c={c}: {p50s[('choice', label, c)] / p50s[('generate-1', label, c)]:.2f}x"
            for label in ("off", "on") for c in CONCURRENCY)
        print(f"\nchoice p50 / 1-token generation p50 (target <= 1): {ratios}")
    rps = {(label, c): r for kind, label, c, _, r, _, _, _ in rows if kind == "generate"}
    speedup = rps[("on", 32)] / rps[("off", 32)]
    print()
    print(f"batching speed-up at concurrency 32: {speedup:.2f}x (target >= 3x: "
          f"{'met' if speedup >= 3 else 'NOT met'})")


def _print_cpu(cpu: dict[tuple[str, int], tuple[dict[str, float], int]]) -> None:
    """CPU milliseconds per request by process, for the generation levels."""
    levels = sorted(cpu, key=lambda level: (level[0], level[1]))
    groups = sorted({g for deltas, _ in cpu.values() for g in deltas if not g.startswith("(")},
                    key=lambda g: -sum(cpu[level][0].get(g, 0.0) for level in levels))
    print()
    print("CPU ms per request by process (generate; user + system time over each level)")
    print("| process | " + " | ".join(f"batching {label} c={c}" for label, c in levels) + " |")
    print("| --- |" + " ---: |" * len(levels))
    for group in groups + ["(all processes)"]:
        cells = []
        for level in levels:
            deltas, n = cpu[level]
            value = (sum(v for g, v in deltas.items() if not g.startswith("("))
                     if group == "(all processes)" else deltas.get(group, 0.0))
            cells.append(f"{value / n * 1000:.1f}")
        print(f"| {group} | " + " | ".join(cells) + " |")
    busy = [cpu[level][0]["(machine busy)"] / cpu[level][0]["(machine total)"] * 100
            for level in levels]
    print("| machine CPU busy, % of all cores | " + " | ".join(f"{b:.0f}" for b in busy) + " |")


def _print_overhead(direct: list[float], endpoint: list[float], health: list[float],
                    timings: list[dict[str, float]], ingress: str) -> None:
    direct_ms, endpoint_ms = statistics.median(direct), statistics.median(endpoint)
    overhead = endpoint_ms - direct_ms
    paired = statistics.median(e - d for d, e in zip(direct, endpoint))
    print()
    print(f"Serve overhead, ingress {ingress}, {len(direct)} alternating pairs (batching off, "
          "concurrency 1): "
          f"endpoint p50 {endpoint_ms:.1f} ms - direct PulseRunner.generate p50 "
          f"{direct_ms:.1f} ms = {overhead:.1f} ms (median of paired differences "
          f"{paired:.1f} ms; target <= 10 ms: {'met' if overhead <= 10 else 'NOT met'})")
    print("\nwhere a request's time goes (batching off, concurrency 1, p50 of each hop):\n")
    print("| hop | p50 ms |")
    print("| --- | ---: |")
    for hop, ms in hop_table(endpoint, timings):
        print(f"| {hop} | {ms:.2f} |")
    print(f"| direct PulseRunner.generate, for comparison | {direct_ms:.2f} |")
    print(f"\nfor scale: GET /healthz p50 {statistics.median(health):.1f} ms (the ingress and "
          f"the gateway only, no model hop); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores at the end")


if __name__ == "__main__":
    sys.exit(main())

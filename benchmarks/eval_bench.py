"""ECGs/s of the evaluation job against the endpoint's own throughput at the same concurrency.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/eval_bench.py --n 400 --concurrency 4
    PYTHONPATH=$PWD .venv/bin/python benchmarks/eval_bench.py --endpoint http://127.0.0.1:8000/v1 \
        --model pulse --n 200 --concurrency 4

Without ``--endpoint`` a fake OpenAI-compatible endpoint runs in a separate process with a
fixed service time per request (``--service-ms``, default 20 ms: a warm tiny-model request).

1. *endpoint alone*: a closed loop of ``concurrency`` threads, each sending the same chat
   requests the job sends (question + PNG data URL, prebuilt) through ``ChatClient`` and
   waiting for the reply: the most this endpoint serves at that concurrency from Python;
2. *evaluation job*: ``ecgvlm.evaluate.run_predictions`` (Ray Data read, expand, actor pool
   of ``concurrency`` HTTP clients, answer parsing, part files written as rows arrive) over
   the same samples at the same concurrency.

The job's overhead is ``1 - job ECG/s / endpoint ECG/s``, steady state (first to last
arrival) and end to end (including Ray Data start-up and actor creation). Target: <= 10%.
A last row times the check of the stored explanations against the split's measurements
(``ecgvlm.evaluate.claims``), which the job runs on the driver after the predictions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def start_fake_endpoint(service_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--delay-s", str(service_s)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake endpoint did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def endpoint_alone(endpoint: str, model: str, rows: list[dict], concurrency: int) -> float:
    """Seconds for ``concurrency`` closed-loop clients to get every row answered."""
    from ecgvlm.evaluate import ChatClient
    from ecgvlm.prompt import chat_messages

    messages = [chat_messages(r["question"], r["options"], r["png"]) for r in rows]
    clients = [ChatClient(endpoint, timeout_s=120, max_retries=0) for _ in range(concurrency)]
    clients[0].chat(model, messages[0])  # warm the connection and the endpoint once
    next_index = iter(range(len(messages)))
    lock = threading.Lock()
    errors = []

    def worker(client):
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            result = client.chat(model, messages[i])
            if result.error:
                errors.append(result.error)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} endpoint errors, e.g. {errors[0]}")
    return wall


def job(endpoint: str, model: str, split_dir: Path, out: Path, n: int, concurrency: int,
        batch_size: int) -> tuple[float, float, int, object]:
    """(end-to-end seconds, first-to-last-arrival seconds, rows, stored predictions) of the
    job's predict phase."""
    from ecgvlm.evaluate import (
        EvalConfig,
        PredictionStore,
        pending_pairs,
        read_split_meta,
        run_predictions,
        split_files,
    )

    config = EvalConfig(data_dir=str(split_dir), output_dir=str(out), endpoint=endpoint,
                        models=(model,), concurrency=concurrency, batch_size=batch_size,
                        flush_every=64, max_retries=0, progress=False, answer_mode="generate")
    files = split_files(config.data_dir, config.split)
    meta = read_split_meta(files)
    store = PredictionStore(out)
    pending = pending_pairs(meta, [(model, "generate", "normal")], store.done_keys())
    arrivals: list[tuple[float, int]] = []
    start = time.perf_counter()
    written = run_predictions(config, files, pending, store,
                              on_rows=lambda k: arrivals.append((time.perf_counter(), k)))
    wall = time.perf_counter() - start
    frame = store.consolidate()
    if written != n or frame["error"].notna().any():
        raise RuntimeError(f"job wrote {written} of {n} rows, errors: {frame['error'].dropna()[:3]}")
    # Steady state: rows after the first arrival, over the time to the last one.
    first_t, first_k = arrivals[0]
    span = arrivals[-1][0] - first_t
    return wall, span, n - first_k, frame


def check_claims_s(frame, rows: list[dict]) -> float:
    """Seconds to check every stored explanation against its sample's measurements, as the
    job does on the driver after the predictions (``evaluate.job.check_explanations``)."""
    from ecgvlm.evaluate.claims import ClaimConfig, check_explanation, measurements_of

    by_id = {r["sample_id"]: r for r in rows}
    config = ClaimConfig()
    start = time.perf_counter()
    records = {sid: (measurements_of(r["measurements"]), list(r["labels"])) for sid, r in by_id.items()}
    for pred in frame.to_dict("records"):
        check_explanation(pred["explanation"], *records[pred["sample_id"]], config)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=None, help="a running endpoint's /v1 URL")
    parser.add_argument("--model", default="pulse")
    parser.add_argument("--n", type=int, default=400, help="ECGs (requests)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--service-ms", type=float, default=20.0, help="fake endpoint only")
    parser.add_argument("--png-size", default="320x240", help="synthetic printout size (WxH)")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for local Ray")
    args = parser.parse_args()

    import ray

    from tests.fakes.mcq_split import sample_rows, write_split

    width, height = (int(v) for v in args.png_size.split("x"))
    rows = sample_rows(args.n // 2 + args.n % 2, png_size=(width, height), measurements=True)[: args.n]
    proc = None
    endpoint = args.endpoint
    if endpoint is None:
        proc, endpoint = start_fake_endpoint(args.service_ms / 1000)
    try:
        with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
            split_dir = write_split(Path(tmp) / "prepared", rows, shards=4)
            alone_s = endpoint_alone(endpoint, args.model, rows, args.concurrency)
            # RAY_ADDRESS: join that cluster; otherwise a fresh local one (never another
            # cluster that happens to run on this machine).
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=False, configure_logging=False)
            else:
                ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            try:
                wall_s, span_s, steady_n, frame = job(endpoint, args.model, split_dir,
                                                      Path(tmp) / "out", len(rows),
                                                      args.concurrency, args.batch_size)
            finally:
                ray.shutdown()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)

    png_kb = sum(len(r["png"]) for r in rows) / len(rows) / 1024
    alone = len(rows) / alone_s
    steady = steady_n / span_s if span_s > 0 else float("nan")
    e2e = len(rows) / wall_s
    where = args.endpoint or f"fake endpoint, {args.service_ms:g} ms/request, separate process"
    print(f"endpoint: {where}; model {args.model}; {len(rows)} ECGs, PNG {png_kb:.0f} KiB avg; "
          f"concurrency {args.concurrency}; batch {args.batch_size}")
    print()
    print("| mode | ECGs | wall s | ECG/s | overhead vs endpoint |")
    print("|---|---|---|---|---|")
    print(f"| endpoint alone (closed loop, {args.concurrency} clients) | {len(rows)} | "
          f"{alone_s:.2f} | {alone:.1f} | - |")
    print(f"| evaluation job, steady state (first to last arrival) | {steady_n} | {span_s:.2f} | "
          f"{steady:.1f} | {100 * (1 - steady / alone):.1f}% |")
    print(f"| evaluation job, end to end (incl. Ray Data + actor start) | {len(rows)} | "
          f"{wall_s:.2f} | {e2e:.1f} | {100 * (1 - e2e / alone):.1f}% |")
    claims_s = check_claims_s(frame, rows)
    print(f"| explanations checked against the signal (driver, after the job) | {len(rows)} | "
          f"{claims_s:.3f} | {len(rows) / claims_s:.0f} | +{100 * claims_s / wall_s:.2f}% of the "
          "job's end-to-end wall |")


if __name__ == "__main__":
    main()

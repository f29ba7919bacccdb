"""What checking explanations against the signal costs next to asking the endpoint.

    PYTHONPATH=$PWD python benchmarks/claims_bench.py --copies 20

Explanations: the grounded reference explanations of the bundled 12-lead records (measured
as ``ecgvlm prepare`` measures them, outside the timing) and the hand-written sentences of
``tests/unit/test_claims.py``, each checked against every record's measurements, repeated
``--copies`` times. Prints the cost per explanation and what share it adds to an evaluation
whose requests take ``--request-ms`` each at ``--concurrency`` (the job checks explanations
on the driver after the predictions, so the check is added once per explanation, not per
request in flight).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--request-ms", type=float, nargs="+", default=[20.0, 200.0, 2000.0],
                        help="endpoint service times to compare with (20 ms: the fake of "
                             "benchmarks/eval_bench.py; seconds: a 7B model)")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    from ecgvlm.evaluate.claims import ClaimConfig, check_explanation
    from ecgvlm.measure import MeasureConfig, grounded_text, measure_record
    from ecgvlm.signal import find_record_paths, read_record
    from tests.unit.test_claims import SENTENCES

    records = []
    for path in find_record_paths(REPO / "data" / "samples"):
        if "mitdb" not in path.parts:
            record = read_record(path)
            records.append((measure_record(record, MeasureConfig(delineate_waves=True)),
                            list(record.labels)))
    texts = [t for m, labels in records for label in labels if (t := grounded_text(label, m))]
    texts += [s for s, _ in SENTENCES if s]
    config = ClaimConfig()
    pairs = [(t, m, labels) for t in texts for m, labels in records] * args.copies
    start = time.perf_counter()
    n_claims = sum(len(check_explanation(t, m, labels, config)) for t, m, labels in pairs)
    elapsed = time.perf_counter() - start
    per_ms = elapsed / len(pairs) * 1000
    print(f"load average {os.getloadavg()[0]:.2f}; {len(pairs)} explanations, {n_claims} claims, "
          f"{elapsed:.2f} s: {per_ms:.3f} ms per explanation")
    print("| request service time | requests in flight | request time per ECG | check per ECG | check adds |")
    print("| --- | --- | --- | --- | --- |")
    for request_ms in args.request_ms:
        per_ecg = request_ms / args.concurrency
        print(f"| {request_ms:g} ms | {args.concurrency} | {per_ecg:.2f} ms | {per_ms:.3f} ms | "
              f"{per_ms / per_ecg:.1%} |")


if __name__ == "__main__":
    main()

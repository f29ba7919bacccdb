"""A constrained choice (``guided_choice``) against generation on the tiny PULSE, direct calls.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/choice_bench.py [--repeats 30]

Alternates, ``--repeats`` times, a ``PulseRunner.generate`` call of each kind on the same
printout-sized image (one torch thread, as a one-CPU Serve replica runs): four letters
scored in one forward pass, a 1-token generation and a 16-token one, at batch 1 and 8, and
prints the p50 milliseconds and each one's ratio to the 1-token generation (the target: a
choice costs no more than it). Run it with nothing else going; it prints the load average.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from ecgvlm import serving as sv
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.prompt import build_prompt

    torch.set_num_threads(1)
    model_dir = make_tiny_pulse(tempfile.mkdtemp(prefix="choice-bench-") + "/tiny")
    runner = sv.PulseRunner(str(model_dir), device="cpu")
    buf = io.BytesIO()
    Image.new("RGB", (1181, 591), "white").save(buf, format="PNG")
    png = buf.getvalue()
    prompt = build_prompt("Which finding does this ECG show?",
                          ["Atrial fibrillation", "Normal sinus rhythm", "Sinus bradycardia",
                           "Right bundle branch block"])
    kinds = {
        "choice (4 letters)": sv.GenerateRequest(prompt, png, guided_choice=("A", "B", "C", "D")),
        "generate 1 token": sv.GenerateRequest(prompt, png, max_new_tokens=1),
        "generate 16 tokens": sv.GenerateRequest(prompt, png, max_new_tokens=16),
    }
    times: dict[tuple[str, int], list[float]] = {(k, b): [] for k in kinds for b in (1, 8)}
    for batch in (1, 8):
        for req in kinds.values():
            runner.generate([req] * batch)  # warm-up
        for _ in range(args.repeats):
            for name, req in kinds.items():
                t0 = time.perf_counter()
                runner.generate([req] * batch)
                times[(name, batch)].append((time.perf_counter() - t0) * 1000)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.repeats} repeats; tiny PULSE, 1 thread")
    print("| request | batch | p50 ms | vs 1-token generation |")
    print("| --- | --- | --- | --- |")
    for batch in (1, 8):
        base = statistics.median(times[("generate 1 token", batch)])
        for name in kinds:
            p50 = statistics.median(times[(name, batch)])
            print(f"| {name} | {batch} | {p50:.1f} | {p50 / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

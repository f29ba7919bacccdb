"""The whole pipeline on local Ray: prepare -> model -> LoRA training -> endpoint -> evaluation.

    make demo                                   # bundled records, tiny random PULSE
    python -m jobs.demo --output-dir runs/demo  # the same
    python -m jobs.demo --model-dir /models/PULSE-7B --data-root /data/cpsc2018 \
        --data-root /data/chapman_shaoxing --data-root /data/mitdb \
        --train-config configs/train_pulse_lora.yaml --evaluate-config configs/evaluate.yaml

Each stage calls the same library functions as its own job (``jobs.prepare``, ``jobs.train``,
the Serve app in ``serve/app.py``, ``jobs.evaluate``) and prints what it did and where its
output is. A rerun skips finished stages: the prepared shards, the trained adapter and the
stored predictions are reused.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL_NOTE = (
    "The model is a tiny randomly initialised PULSE-layout checkpoint: these numbers test the "
    "plumbing (data, training, serving, evaluation), not PULSE. Expect chance-level accuracy; "
    "run with --model-dir pointing at real PULSE-7B weights for the study."
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage(n: int, title: str) -> float:
    print(f"\n=== [{n}/5] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"    done in {time.perf_counter() - t0:.0f} s: {what}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    from ecgvlm.cli import port_number, positive_int

    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="runs/demo", help="everything the demo writes")
    p.add_argument("--model-dir", default=None,
                   help="a PULSE checkpoint directory (default: build a tiny random one)")
    p.add_argument("--data-root", action="append", default=[],
                   help="dataset folder(s) to prepare (default: the prepare config's sources)")
    p.add_argument("--prepare-config", default=str(REPO / "configs/prepare_demo.yaml"))
    p.add_argument("--train-config", default=str(REPO / "configs/train_tiny_cpu.yaml"))
    p.add_argument("--evaluate-config", default=str(REPO / "configs/evaluate_demo.yaml"))
    p.add_argument("--port", type=port_number, default=0,
                   help="endpoint port (default: a free one)")
    p.add_argument("--num-cpus", type=positive_int, default=8,
                   help="logical CPUs of the local Ray (above the core count on purpose: the "
                        "endpoint's replicas and the trainer's workers share the machine)")
    return p


def run_demo(args: argparse.Namespace) -> int:
    from ecgvlm.config import load_config
    from ecgvlm.dataset import PrepareConfig, check_inputs, prepare_dataset

    out = Path(args.output_dir).resolve()
    # The prepare config and its records are checked before Ray starts and before the heavy
    # imports: a typo is said in a second.
    overrides = [f"output_dir={out / 'prepared'}"]
    if args.data_root:
        roots = ", ".join(f"{{root: {Path(r).resolve()}}}" for r in args.data_root)
        overrides.append(f"sources=[{roots}]")
    prepare_config = load_config(PrepareConfig, args.prepare_config, overrides)
    records = check_inputs(prepare_config)  # a wrong --data-root too, as `ecgvlm prepare` says it
    if args.port:  # a taken one is said now, not by Serve's proxy once the model is trained
        from ecgvlm.local_ray import check_port_free

        check_port_free("127.0.0.1", args.port)

    import ray
    from ray import serve

    from ecgvlm.evaluate import EvalConfig, evaluate
    from ecgvlm.model import make_tiny_pulse
    from ecgvlm.report import console_tables
    from ecgvlm.serving import ServeArgs, replica_start_error
    from ecgvlm.train import TrainConfig, run_training
    from serve.app import build_app

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",  # the demo is local by definition, even beside a running cluster
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath,
                                  "DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}},
    )
    try:
        t0 = _stage(1, "prepare: read records, render printouts, build MCQs (Ray Data)")
        prepared = prepare_dataset(prepare_config, records)
        summary = prepared.summary()
        _done(t0, f"{summary} -> {out / 'prepared'}")

        t0 = _stage(2, "model: the PULSE checkpoint")
        if args.model_dir:
            model_dir = Path(args.model_dir).resolve()
            _done(t0, f"using {model_dir}")
        else:
            model_dir = out / "tiny-pulse"
            if not (model_dir / "config.json").is_file():
                make_tiny_pulse(model_dir, seed=0)
            _done(t0, f"tiny random PULSE-layout checkpoint at {model_dir}")

        t0 = _stage(3, "train: LoRA (r=4, alpha=8, q/k/v/o) with Ray Train + DeepSpeed")
        train_config = load_config(TrainConfig, args.train_config, [
            f"model_dir={model_dir}",
            f"data_dir={out / 'prepared'}",
            f"storage_path={out / 'train'}",
            f"output_dir={out / 'adapter'}",
        ])
        adapter_dir = Path(train_config.output_dir)
        if (adapter_dir / "adapter_config.json").is_file():
            # Deleting the adapter alone re-exports it from the finished run below. A
            # retrained adapter answers differently: the evaluation's stored answers are
            # this one's, and stage 5 refuses to mix them with a new one's (inputs.json).
            _done(t0, f"adapter already trained at {adapter_dir} (to retrain, delete it, its "
                      f"run {train_config.run_dir()} and {out / 'eval'}, whose answers are "
                      "this adapter's)")
        else:
            resume = (Path(train_config.run_dir()) / "checkpoint_manager_snapshot.json").exists()
            run_training(train_config, resume=resume)
            _done(t0, f"adapter at {adapter_dir}")

        t0 = _stage(4, "serve: pulse, pulse-lora and gpt-4o on one endpoint (Ray Serve)")
        port = args.port or _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            serve.run(
                build_app(ServeArgs(model_dir=str(model_dir), adapters={"demo": str(adapter_dir)})),
                name="ecgvlm",
                route_prefix="/",
            )
        except RuntimeError as e:  # a replica that did not start: why, in one line
            raise replica_start_error(serve.status(), "ecgvlm") or e
        endpoint = f"http://127.0.0.1:{port}/v1"
        if not os.environ.get("OPENAI_API_KEY"):
            print("    OPENAI_API_KEY is not set: gpt-4o answers 503 and the LLM judge is "
                  "skipped; the report says so.")
        _done(t0, f"endpoint at {endpoint}")

        t0 = _stage(5, "evaluate: predictions, metrics, judge, report (Ray Data -> endpoint)")
        eval_config = load_config(EvalConfig, args.evaluate_config, [
            f"data_dir={out / 'prepared'}",
            f"output_dir={out / 'eval'}",
            f"endpoint={endpoint}",
        ])
        report, written = evaluate(eval_config)
        print(console_tables(report))
        _done(t0, f"{', '.join(sorted(written))} in {out / 'eval'}")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\nreport: {out / 'eval' / 'report.md'}")
    if not args.model_dir:
        print(TINY_MODEL_NOTE)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from ecgvlm.cli import report_user_errors

    return report_user_errors("demo", lambda: run_demo(args))


if __name__ == "__main__":
    sys.exit(main())

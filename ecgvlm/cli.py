"""The ``ecgvlm`` command: a thin shell over the same functions the jobs call.

Each subcommand imports what it needs inside its handler, so ``ecgvlm inspect`` does not pay
for importing torch or ray.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ecgvlm.local_ray import INGRESSES

if TYPE_CHECKING:
    from ecgvlm.train import TrainConfig
    from ecgvlm.train.tune import TuneConfig


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ecgvlm.labels import label_name
    from ecgvlm.signal import read_record

    rec = read_record(args.path, dataset=args.dataset)
    rows = [
        ("record", rec.record_id),
        ("dataset", rec.dataset),
        ("patient", rec.patient_id or "unknown"),
        ("fs", f"{rec.fs_hz:g} Hz"),
        ("duration", f"{rec.duration_s:.2f} s ({rec.n_samples} samples)"),
        ("leads", f"{len(rec.leads)}: {', '.join(rec.leads)}"),
    ]
    for key in ("age", "sex"):
        if key in rec.meta:
            rows.append((key, str(rec.meta[key])))
    rows.append(("source codes", ", ".join(rec.source_codes) or "none"))
    for key in ("aami_counts", "beat_counts", "rhythm_fractions"):
        if key in rec.meta:
            rows.append(
                (key.replace("_", " "), ", ".join(f"{k} {v}" for k, v in rec.meta[key].items()))
            )
    for key, value in rows:
        print(f"{key:<18}{value}")
    print("labels")
    for lab in rec.labels or ("none",):
        print(f"  {lab:<14}{label_name(lab) if lab != 'none' else ''}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from ecgvlm.labels import label_name
    from ecgvlm.signal import ReadFailure, iter_records, summarize_records

    failures: list[ReadFailure] = []
    records = iter_records(args.root, dataset=args.dataset, failures=failures, progress=False)
    summary = summarize_records(records)
    if not summary and not failures:
        raise ValueError(_no_records_under(args.root))
    print(
        f"{'dataset':<18}{'records':>8}{'recordings':>11}{'patients':>9}"
        f"{'hours':>8}{'labels':>7}{'unknown':>8}"
    )
    for key, s in summary.items():
        print(
            f"{key:<18}{s.n_records:>8}{s.n_recordings:>11}{s.n_patients:>9}"
            f"{s.duration_s / 3600:>8.2f}{len(s.label_counts):>7}{sum(s.unknown_codes.values()):>8}"
        )
    for key, s in summary.items():
        print(f"\n{key}: records per label")
        for lab, n in sorted(s.label_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {lab:<14}{n:>6}  {label_name(lab)}")
    print(f"\nfailures: {len(failures)}")
    for f in failures:
        print(f"  {f.path}: {type(f.error).__name__}: {f.error.problem}")
    # Unreadable records make the command fail, so scripts notice; the table is still printed.
    return 1 if failures else 0


def _cmd_measure(args: argparse.Namespace) -> int:
    import json

    from ecgvlm.measure import check_finding, format_table, measure_record
    from ecgvlm.records import EcgRecord
    from ecgvlm.signal import read_record

    if args.duration_s is not None and args.duration_s <= 0:
        raise ValueError(f"--duration-s must be more than 0 seconds, got {args.duration_s:g}")
    rec = read_record(args.path, dataset=args.dataset)
    if args.start_s or args.duration_s:
        a = round(args.start_s * rec.fs_hz)
        b = rec.n_samples if args.duration_s is None else a + round(args.duration_s * rec.fs_hz)
        if not 0 <= a < min(b, rec.n_samples):
            raise ValueError(
                f"--start-s {args.start_s} is outside {rec.record_id} ({rec.duration_s:.1f} s)"
            )
        rec = EcgRecord(rec.record_id, rec.dataset, rec.signal_mv[a:b], rec.fs_hz, rec.leads,
                        rec.labels, rec.patient_id, rec.start_s + args.start_s)
    m = measure_record(rec)
    if args.json:
        print(json.dumps(m.to_dict(), indent=1))
        return 0
    print(format_table(m))
    checks = [check_finding(lab, m) for lab in rec.labels if not lab.startswith("UNK:")]
    if checks:
        print("\nlabels against measurements")
        for c in checks:
            print(f"  {c.summary()}")
    return 0


def _no_records_under(root: str) -> str:
    # An empty table with status 0 read as "this folder was summarized" (a wrong folder, say).
    return (f"no records found under {root} (a record is a WFDB .hea with its signal, or a "
            ".mat or .csv of a known data set; sub-folders are searched)")


def _cmd_audit(args: argparse.Namespace) -> int:
    from ecgvlm.measure.audit import audit_records
    from ecgvlm.signal import ReadFailure, iter_records

    failures: list[ReadFailure] = []
    result = audit_records(iter_records(args.root, dataset=args.dataset, failures=failures))
    if not result.n_records and not failures:
        raise ValueError(_no_records_under(args.root))
    print(f"{result.n_records} records audited ({len(failures)} unreadable)")
    print(f"{'label':<10}{'consistent':>11}{'contradicted':>13}{'not measurable':>16}")
    for entry in result.labels.values():
        counts = f"{entry.consistent:>11}{entry.inconsistent:>13}{entry.not_measurable:>16}"
        print(f"{entry.label:<10}{counts}")
    if result.contradictions:
        print("\nlabels contradicted by measurements")
        for record_id, _, summary in result.contradictions:
            print(f"  {record_id}  {summary}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from ecgvlm.render import RenderConfig, render_printout
    from ecgvlm.signal import read_record

    if Path(args.output).suffix.lower() != ".png":  # the bytes written are a PNG whatever the name
        raise ValueError(f"-o {args.output}: a printout is a PNG image; give a path ending in .png")
    record = read_record(args.path, dataset=args.dataset)
    if args.start_s:
        first = round(args.start_s * record.fs_hz)
        if not 0 <= first < record.n_samples:
            raise ValueError(
                f"--start-s {args.start_s} is outside the record ({record.duration_s:g} s)"
            )
        record = replace(
            record, signal_mv=record.signal_mv[first:], start_s=record.start_s + args.start_s
        )
    fields = {"layout": args.layout or "auto", "dpi": args.dpi, "style": args.style}
    config = RenderConfig(
        **{k: v for k, v in fields.items() if v is not None}, augment=bool(args.augment)
    )
    printout = render_printout(record, config, seed=args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_bytes(printout.png)
    if args.geometry:
        Path(args.geometry).write_text(printout.to_json())
    width, height = printout.size_px
    print(
        f"{args.output}: {width}x{height} px, layout {printout.layout}, "
        f"{len(printout.panels)} panels, config {config.config_hash()}"
    )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    import json

    from ecgvlm.config import load_config, resolve_paths
    from ecgvlm.dataset import PrepareConfig, check_inputs, prepare_dataset

    overrides = [*args.overrides, *(["llava=true"] if args.format == "llava" else [])]
    # Ray Data tasks do not run in this directory: the output path is made absolute here, and
    # the records' paths where they are listed (ecgvlm.dataset.list_sources).
    config = load_config(PrepareConfig, args.config, overrides)
    config = resolve_paths(config, ["output_dir"])
    records = check_inputs(config)  # said at once, not after Ray has started
    with _ray_for_job(args.address, args.num_cpus):
        result = prepare_dataset(config, records)
    print(json.dumps(result.summary()))
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from ecgvlm.model import make_tiny_pulse

    if args.model_command == "make-tiny":
        out = make_tiny_pulse(args.output_dir, seed=args.seed, merge=args.merge)
        size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        print(f"wrote tiny PULSE checkpoint ({args.merge}, seed {args.seed}, {size_mb:.1f} MB) to {out}")
        return 0
    raise ValueError(f"unknown model command {args.model_command!r}")


def _cmd_tune(args: argparse.Namespace) -> int:
    import math
    import os

    from ecgvlm.config import load_config
    from ecgvlm.train.run import check_inputs
    from ecgvlm.train.tune import TuneConfig, check_search, run_search

    config = load_config(TuneConfig, args.config, args.overrides)
    base = config.base_train_config()  # its errors before Ray starts
    # Said at once, not after Ray has started (each trial checks its inputs again, and
    # run_search the search's).
    check_inputs(base)
    check_search(config, args.resume)
    # One trial's run, plus the sliver its driver function holds.
    num_cpus = args.num_cpus or max(os.cpu_count() or 1, math.ceil(base.cpus_needed()) + 1)
    try:
        with _ray_for_training(base, num_cpus):
            run_search(config, resume=args.resume)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(_tune_resume_hint(config)) from e
    return 0


def _tune_resume_hint(config: TuneConfig) -> str:
    """How to pick up a stopped search, as ``check_search`` will judge the rerun: with
    ``--resume`` once Tune has saved its trials, else the same command as it was."""
    from ecgvlm.config import resolve_paths
    from ecgvlm.train.tune import search_saved

    experiment = resolve_paths(config, config.PATH_FIELDS).experiment_dir()
    if search_saved(experiment):
        return "rerun with --resume to continue the search"
    return f"the search had not saved its state in {experiment} yet: rerun the same command"


def _cmd_train(args: argparse.Namespace) -> int:
    from ecgvlm.config import load_config
    from ecgvlm.train import TrainConfig, run_training
    from ecgvlm.train.run import check_inputs

    config = load_config(TrainConfig, args.config, args.overrides)
    summary = check_inputs(config, args.resume)  # said at once, not after Ray has started
    try:
        with _ray_for_training(config, args.num_cpus):
            run_training(config, resume=args.resume, summary=summary)
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(_train_resume_hint(config)) from e
    return 0


def _train_resume_hint(config: TrainConfig) -> str:
    """How to pick up a stopped run, as ``check_run_dir`` will judge the rerun: with
    ``--resume`` once Ray Train has recorded the run, else the same command as it was."""
    from ecgvlm import storage
    from ecgvlm.config import resolve_paths
    from ecgvlm.train.run import _RUN_SNAPSHOT

    run_dir = resolve_paths(config, config.PATH_FIELDS).run_dir()
    if storage.exists(storage.join(run_dir, _RUN_SNAPSHOT)):
        return f"rerun with --resume to continue from the last checkpoint {run_dir} recorded"
    return f"no checkpoint was recorded in {run_dir} yet: rerun the same command"


@contextlib.contextmanager
def _ray_for_training(config: TrainConfig, num_cpus: int | None) -> Iterator[None]:
    """Ray for ``ecgvlm train`` and ``ecgvlm tune``: under `ray job submit` RAY_ADDRESS names
    the cluster; otherwise a private local Ray. A caller's Ray (a test's) is used as it is
    and left running."""
    import math
    import os

    import ray

    from ecgvlm.local_ray import check_ray_reachable
    from ecgvlm.train.run import check_cluster_cpus, pin_ray_address

    started_here = not ray.is_initialized()
    if started_here:
        if os.environ.get("RAY_ADDRESS"):
            check_ray_reachable(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
            # A job's runtime env (working_dir, env_vars) already applies; adding one here
            # would conflict with it.
            ray.init()
        else:
            accelerator = os.environ.get("DS_ACCELERATOR", "cuda" if config.use_gpu else "cpu")
            # Logical CPUs for the workers and the data pipeline even on a 2-core machine
            # (Ray would otherwise count the cores, and the data reads would never run).
            num_cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(config.cpus_needed()))
            check_cluster_cpus(config, num_cpus)  # too few: said before Ray starts
            # With the dashboard (about 1.3 s more to start here): Ray Train's placement-group
            # cleaner asks it every second whether the run's controller is alive. Without one
            # it logs a warning each time, or asks another Ray's dashboard on the default
            # port (a `ray start` cluster's), which knows nothing of this run.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                     dashboard_host="127.0.0.1",
                     runtime_env={"env_vars": {"DS_ACCELERATOR": accelerator},
                                  "worker_process_setup_hook": pin_ray_address})
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _stop_on_sigterm() -> None:
    """Make SIGTERM end the command like Ctrl-C does, so its ``finally`` blocks run."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (``--host``) is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve to any interface


def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    from ecgvlm.local_ray import check_port_free, haproxy_binary, start_head, stop_head
    from ecgvlm.serving import (
        PulseReplicaArgs,
        ServeArgs,
        absolute_paths,
        check_paths,
        parse_adapter_specs,
        replica_start_error,
    )

    # serve/app.py sits beside the package in a source checkout; replicas import it too.
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "serve" / "app.py").is_file():
        raise FileNotFoundError(
            f"serve/app.py not found under {repo}: run `ecgvlm serve` from a source checkout"
        )
    adapters = parse_adapter_specs(args.adapter)
    pulse = PulseReplicaArgs(num_gpus="auto" if args.num_gpus is None else args.num_gpus)
    serve_args = absolute_paths(ServeArgs(
        model_dir=args.model_dir, adapters=adapters, dtype=args.dtype, device=args.device,
        pulse=pulse, abstain_below=args.abstain_below, report_dir=args.report_dir,
    ))
    check_paths(serve_args)  # before paying for Ray's start
    if args.ingress == "haproxy":
        haproxy_binary()
    if not _is_loopback(args.host) and not os.environ.get(serve_args.auth_token_env):
        # Served, not refused: a trusted network is the user's call. The reading room takes
        # uploaded records, which may be patients'.
        print(f"ecgvlm serve: warning: {args.host} is reachable from other machines and "
              f"{serve_args.auth_token_env} is not set: anyone who reaches port {args.port} "
              "can use every model and upload records; set it to require a token",
              file=sys.stderr, flush=True)
    check_port_free(args.host, args.port)  # the machine's state, after the command's own errors

    _stop_on_sigterm()
    # A private head on free ports, not ray.init()'s fixed ones (its dashboard agent's 52365
    # would break a `ray start` cluster on this machine); everything it starts is stopped.
    # Logical CPUs above the core count: fractional replicas and a trainer can share a laptop.
    head = None
    try:
        head = start_head(num_cpus=args.num_cpus or max(8, os.cpu_count() or 1),
                          dashboard=False, ingress=args.ingress)
        os.environ.update(head.env)  # its auth token, before Ray is imported
        sys.path.insert(0, str(repo))
        import ray
        from ray import serve

        from serve.app import build_app

        pythonpath = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)
        ray.init(address=head.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        _stop_on_sigterm()  # again: ray.init installs a handler that aborts the process
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(build_app(serve_args), name="ecgvlm", route_prefix="/")
        except RuntimeError as e:  # a replica that did not start: why, in one line
            raise replica_start_error(serve.status(), "ecgvlm") or e
        models = ["pulse", "gpt-4o"] + (["pulse-lora"] if adapters else [])
        models += [f"pulse-lora:{n}" for n in adapters]
        ingress = "Ray Serve's HTTP proxy"
        if args.ingress == "haproxy":
            stats_port = head.env["RAY_SERVE_HAPROXY_STATS_PORT"]
            ingress = f"HAProxy, its stats at http://127.0.0.1:{stats_port}/stats"
        print(
            f"ecgvlm endpoint ready at http://{args.host}:{args.port}/v1 "
            f"(models: {', '.join(models)}; ingress: {ingress}; "
            f"Ray: private head in {head.temp_dir}); "
            f"the reading room at http://{args.host}:{args.port}/ ; Ctrl-C stops it",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the endpoint", file=sys.stderr)
    finally:
        if head is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            stop_head(head)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ecgvlm.config import load_config, resolve_paths
    from ecgvlm.evaluate import (
        EvalConfig,
        check_inputs,
        evaluate,
        settings_env_vars,
        use_fixed_mmap_threshold,
        use_returning_arrow_pool,
    )
    from ecgvlm.report import console_tables

    # Before anything imports pyarrow (its readers' pool is chosen then) and before Ray starts
    # (a local Ray's workers inherit both, a cluster's get them with the job's runtime env):
    # freed memory goes back to the OS (docs/evaluate.md).
    use_returning_arrow_pool()
    use_fixed_mmap_threshold()
    config = load_config(EvalConfig, args.config, args.overrides)
    config = resolve_paths(config, ["data_dir", "output_dir"])
    inputs = check_inputs(config)  # a wrong path or a down endpoint said before Ray starts
    # The HTTP client actors need little CPU.
    with _ray_for_job(args.address, args.num_cpus, env_vars=settings_env_vars()):
        report, written = evaluate(config, inputs)
    print(console_tables(report))
    print(f"wrote {', '.join(sorted(written))} to {config.output_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    # The demo wires the jobs together, and jobs/ sits beside the package in a source checkout.
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "jobs" / "demo.py").is_file():
        raise FileNotFoundError(f"jobs/demo.py not found under {repo}: run from a source checkout")
    sys.path.insert(0, str(repo))
    from jobs.demo import main as demo_main

    argv = ["--output-dir", args.output_dir]
    if args.model_dir:
        argv += ["--model-dir", args.model_dir]
    for root in args.data_root:
        argv += ["--data-root", root]
    return demo_main(argv)


@contextlib.contextmanager
def _ray_for_job(address: str | None, num_cpus: int | None,
                 env_vars: dict[str, str] | None = None) -> Iterator[None]:
    """Ray for one job: the cluster named by ``address`` or RAY_ADDRESS, else a private local one.

    Under ``ray job submit`` RAY_ADDRESS names the job's cluster. Without it a new local Ray
    is started (never a ``ray start`` cluster found on this machine by accident) and shut
    down at the end; a caller's Ray (e.g. a test's) is used as it is and left running.
    ``env_vars`` are for the job's workers: a local Ray's inherit them from this process, a
    cluster's get them with the job's runtime env, except those the submitted job's own
    runtime env sets (``ray job submit --runtime-env-json``), which it keeps.
    """
    import os

    import ray

    from ecgvlm.local_ray import check_ray_reachable

    if ray.is_initialized():
        yield
        return
    named_by = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    if not local:
        check_ray_reachable(address, named_by)
    runtime_env = None
    if env_vars and not local:
        own = _submitted_job_env_vars()
        # Ray refuses a driver's runtime env that names a variable the job's names too.
        kept = {k: v for k, v in env_vars.items() if k not in own}
        runtime_env = {"env_vars": kept} if kept else None
    ray.init(address=address, num_cpus=num_cpus if local else None,
             include_dashboard=False if local else None, log_to_driver=False,
             configure_logging=False, runtime_env=runtime_env)
    try:
        yield
    finally:
        ray.shutdown()


def _submitted_job_env_vars() -> set[str]:
    """The variables that the runtime env of the job this driver runs in sets, where it runs
    under ``ray job submit``: Ray's job supervisor hands the job's config to its driver in
    ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (``ray.init`` merges it with the driver's own)."""
    import json
    import os

    config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return set((config.get("runtime_env") or {}).get("env_vars") or {})


#: Errors of a folder a job cannot write (full, read-only, not a folder, not ours): the
#: message names the path, and the fix is the user's ("[Errno 28] No space left on device:
#: '.../part-00003.parquet'").
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                             errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is bad input or a failed precondition the user can fix.

    The library raises ValueError subclasses for bad input (configs, records, checkpoints)
    and RuntimeError subclasses of its own for unmet preconditions (no data, an unreachable
    endpoint); both are reported in one line. Anything else is a bug and keeps its traceback.
    """
    if isinstance(error, (ValueError, FileNotFoundError)):
        return True
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return True
    # ecgvlm.storage.StorageError: a location that cannot be reached or must not be used.
    return (isinstance(error, (RuntimeError, OSError))
            and type(error).__module__.startswith("ecgvlm."))


def _error_text(error: BaseException) -> str:
    """What the one line says: a pydantic ValidationError's messages with their fields,
    without its dump of the whole input and a link to its docs."""
    if type(error).__name__ == "ValidationError" and hasattr(error, "errors"):
        return "; ".join(
            (".".join(map(str, err["loc"])) + ": " if err["loc"] else "")
            + err["msg"].removeprefix("Value error, ") for err in error.errors())
    return str(error)


def _task_cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, out of the ``RayTaskError`` that carries it.

    Ray re-raises a task's exception in the caller as a subclass of both ``RayTaskError``
    and the original class, whose text is the remote traceback; ``cause`` is the original.
    """
    while isinstance(getattr(error, "cause", None), BaseException) and any(
        cls.__name__ == "RayTaskError" for cls in type(error).__mro__
    ):
        error = error.cause
    return error


#: How each command picks up where Ctrl-C stopped it (said on the line that reports it).
_RESUME_HINTS = {
    "prepare": "rerun the same command: the finished shards are kept",
    # train and tune say their own once Ray has started (_train/_tune_resume_hint); before,
    # nothing of the run exists yet.
    "train": "rerun the same command",
    "tune": "rerun the same command",
    "evaluate": "rerun the same command: the answers already stored are not asked again",
    "demo": "rerun it: the finished stages are reused",
}


def report_user_errors(command: str, run: Callable[[], int | None]) -> int:
    """``run()``'s exit status; a user error (``is_user_error``) becomes one line and status 2.

    The line is ``ecgvlm <command>: error: <message>`` on stderr, without a traceback. Ctrl-C
    is the user's too: ``ecgvlm <command>: interrupted`` and how to resume, status 130 (the
    shell's for SIGINT). The ``ecgvlm`` command and every ``jobs/*`` entrypoint report errors
    through this.
    """
    try:
        return int(run() or 0)
    except KeyboardInterrupt as e:
        hint = str(e) or _RESUME_HINTS.get(command)  # a command may know better
        print(f"ecgvlm {command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as raised:
        e = _task_cause(raised)
        if not is_user_error(e):
            raise
        message = " ".join(_error_text(e).split()) or type(e).__name__
        print(f"ecgvlm {command}: error: {message}", file=sys.stderr)
        return 2


def run_command(argv: list[str]) -> int:
    """Run ``ecgvlm ARGV...``: the ``ecgvlm`` command, and what ``jobs/*`` entrypoints call."""
    args = build_parser().parse_args(argv)
    return report_user_errors(args.command, lambda: args.func(args))


def positive_int(text: str) -> int:
    """argparse's type for ``--num-cpus`` (here and in ``jobs.demo``): a Ray with no CPU
    runs no task (``prepare --num-cpus 0`` had not finished after 120 s here)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def port_number(text: str) -> int:
    """argparse's type for ``--port`` (here and in ``jobs.demo``, where 0 means a free one):
    ``--port 99999`` ended in a traceback from the socket's bind."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number, 0-65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgvlm", description="Read ECGs with vision-language models, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show leads, fs, duration and labels of a record")
    p.add_argument("path", help="record path as wfdb takes it (no extension)")
    p.add_argument("--dataset", default=None, help="dataset key when it cannot be recognised")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("datasets", help="dataset utilities")
    dsub = p.add_subparsers(dest="datasets_command", required=True)
    s = dsub.add_parser("summarize", help="table of records and label counts per dataset")
    s.add_argument("root", help="a dataset folder or a folder of dataset folders")
    s.add_argument("--dataset", default=None)
    s.set_defaults(func=_cmd_datasets)

    s = dsub.add_parser("audit", help="records whose labels contradict their measurements")
    s.add_argument("root", help="a dataset folder or a folder of dataset folders")
    s.add_argument("--dataset", default=None)
    s.set_defaults(func=_cmd_audit)

    p = sub.add_parser("measure", help="rate, rhythm, intervals, axis and ST of a record")
    p.add_argument("path", help="record path as wfdb takes it (no extension)")
    p.add_argument("--dataset", default=None, help="dataset key when it cannot be recognised")
    p.add_argument("--start-s", type=float, default=0.0, help="start this far into the record")
    p.add_argument("--duration-s", type=float, default=None, help="measure only this long")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.set_defaults(func=_cmd_measure)

    p = sub.add_parser("render", help="draw a record as a clinical printout PNG")
    p.add_argument("path")
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--layout", default=None)
    p.add_argument("--dpi", type=int, default=None)
    p.add_argument("--style", default=None)
    p.add_argument("--augment", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default=None, help="dataset key when it cannot be recognised")
    p.add_argument("--start-s", type=float, default=0.0, help="start this far into the record")
    p.add_argument("--geometry", default=None, help="also write the panel geometry as JSON")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("prepare", help="build the MCQ data set with Ray Data")
    p.add_argument("--config", required=True)
    p.add_argument("--format", choices=["parquet", "llava"], default="parquet",
                   help="llava: also write LLaVA JSON + image folder")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="CPUs of a new local Ray")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("model", help="PULSE checkpoint utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    s = msub.add_parser("make-tiny", help="write a tiny random PULSE-layout checkpoint")
    s.add_argument("output_dir")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--merge", default="flat", choices=["flat", "spatial_unpad"])
    s.set_defaults(func=_cmd_model)

    p = sub.add_parser("train", help="LoRA-fine-tune PULSE with Ray Train + DeepSpeed")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="logical CPUs of a new local Ray (default: enough for the workers "
                        "and the data pipeline)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="search training hyperparameters with Ray Tune (ASHA)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="logical CPUs of a new local Ray (default: enough for one trial)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (train.max_steps=8 ...)")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("serve", help="serve pulse, pulse-lora and gpt-4o on one endpoint")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="logical CPUs of its private Ray (default: max(8, cores))")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   default="auto", help="PULSE's weights (auto: bfloat16 on a GPU, else float32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU Ray reserves for the replica, else CPU")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs Ray reserves for the PULSE replica (default: 1 when there is one)")
    p.add_argument("--abstain-below", type=float, default=0.0, metavar="P",
                   help="/v1/ecg/interpret says uncertain when the most probable option's "
                        "probability is below P, in [0, 1) (default 0: never)")
    p.add_argument("--report-dir", default=None, metavar="DIR",
                   help="an evaluation's output_dir for the reading room's report view")
    p.add_argument("--ingress", choices=INGRESSES, default="proxy",
                   help="what answers on --port: Ray Serve's HTTP proxy (default), or HAProxy "
                        "forwarding to the gateway replica's own HTTP server (about 5 ms less "
                        "per request here; docs/serve.md)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("evaluate", help="evaluate models through the endpoint")
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--num-cpus", type=positive_int, default=None,
                   help="CPUs of a new local Ray")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="run the whole pipeline on the bundled records")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--model-dir", default=None, help="real PULSE weights (default: tiny random)")
    p.add_argument("--data-root", action="append", default=[], help="dataset folder(s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

"""The endpoint's arguments (serve/config.yaml's ``args``): models, upstream, limits, replicas;
the checks made before it starts, and why it did not."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ecgvlm.serving.limits import ServeLimits
from ecgvlm.serving.proxy import OpenAISettings

#: Adapters kept loaded per PULSE replica by Serve's multiplexing cache (least recently used
#: are evicted beyond this); ``@serve.multiplexed`` fixes it when the class is defined.
MAX_ADAPTERS_PER_REPLICA = 4


class BatchingArgs(BaseModel):
    """How the PULSE replica batches requests (``BatchQueue``); max_batch_size 1 turns batching
    off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0)
    #: Token budget of one generate call, rows x (longest prompt + max_tokens); a batch
    #: over it runs as several calls. None: derived on a GPU from the memory free after
    #: loading (PULSE-7B in bf16 holds 0.5 MiB of KV cache per token), unbounded on CPU.
    max_batch_tokens: int | None = Field(None, ge=1)


class AutoscalingArgs(BaseModel):
    """Serve autoscaling: replicas follow the ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas "
                f"({self.max_replicas})"
            )
        return self


class ReplicaArgs(BaseModel):
    """Replica count (fixed or autoscaled), resources and concurrency of one deployment.

    ``num_cpus`` is fractional on purpose: local runs give Ray logical CPUs and a replica
    holding a whole core starves a trainer on a 2-core machine (DESIGN.md).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingArgs | None = None
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    #: Requests each caller (the HTTP proxy, the gateway) holds for this deployment while
    #: every replica has ``max_ongoing_requests``; more are shed at once with a 503 and
    #: ``Retry-After: retry_after_s`` instead of waiting without bound. -1: no limit.
    max_queued_requests: int = Field(-1, ge=-1)
    retry_after_s: float = Field(1.0, gt=0)

    def deployment_options(self, num_gpus: float | None = None) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (``num_gpus`` overrides the field)."""
        num_gpus = self.num_gpus if num_gpus is None else num_gpus
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class PulseReplicaArgs(ReplicaArgs):
    """The PULSE replica's: by default one whole core and, when the cluster has a GPU, one GPU.

    ``num_gpus: auto`` is there because a replica Ray reserved no GPU for still sees the
    node's GPUs: PULSE would load onto a card Ray gives to other work.
    """

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | Literal["auto"] = "auto"  # type: ignore[assignment]
    # A batch of 8 answers at a time: 64 more waiting is already 8 batches of explanations.
    max_queued_requests: int = Field(64, ge=-1)

    @model_validator(mode="after")
    def _gpus_not_negative(self) -> PulseReplicaArgs:
        if self.num_gpus != "auto" and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or auto, got {self.num_gpus}")
        return self

    def gpus(self, cluster_gpus: float) -> float:
        """GPUs to reserve: ``auto`` is one when ``cluster_gpus`` has one, else none."""
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return float(self.num_gpus)


class ServeArgs(BaseModel):
    """Everything the endpoint is built from (``serve/config.yaml``'s ``args``).

    Attributes:
        model_dir: PULSE checkpoint directory; None serves only ``gpt-4o``.
        adapters: Adapter name -> PEFT directory; the first is ``pulse-lora``.
        dtype: Weight dtype on the replica: ``auto`` (bfloat16 on CUDA, float32 on CPU),
            ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when Ray reserved a GPU for the replica), ``cpu`` or ``cuda``.
        attn_implementation: ``sdpa``, or ``flash_attention_2`` where flash-attn is
            installed, or ``eager``; /v1/models reports the one that runs.
        openai: The ``gpt-4o`` upstream.
        limits: Request limits.
        auth_token_env: Environment variable holding the bearer token clients must send;
            unset or empty turns auth off. Read by the app builder, never logged.
        batching: PULSE request batching.
        samples_dir: Records the reading room (``GET /``) offers in its list, WFDB or CPSC
            files under this folder; None: the repository's ``data/samples`` when ecgvlm runs
            from a checkout, else none.
        report_dir: An evaluation's ``output_dir`` the reading room's second view shows
            (``report.md``, its plots, a browser of ``predictions.parquet``); None: none.
        abstain_below: ``/v1/ecg/interpret`` calls an answer ``uncertain`` when its most
            probable option's probability is below this, in [0, 1); 0 never does.
        pulse, gateway, proxy: Replicas and resources of each deployment.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_dir: str | None = None
    adapters: dict[str, str] = Field(default_factory=dict)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    limits: ServeLimits = Field(default_factory=ServeLimits)
    auth_token_env: str = "ECGVLM_API_TOKEN"
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    samples_dir: str | None = None
    report_dir: str | None = None
    abstain_below: float = Field(0.0, ge=0.0, lt=1.0)
    pulse: PulseReplicaArgs = Field(default_factory=PulseReplicaArgs)
    gateway: ReplicaArgs = Field(default_factory=lambda: ReplicaArgs(num_cpus=0.25,
                                                                     max_ongoing_requests=256))
    proxy: ReplicaArgs = Field(default_factory=lambda: ReplicaArgs(num_cpus=0.1))

    @model_validator(mode="after")
    def _check_adapters(self) -> ServeArgs:
        for name in self.adapters:
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(
                    f"adapters: name {name!r} must be letters, digits, '.', '_' or '-'"
                )
        if self.adapters and self.model_dir is None:
            raise ValueError("adapters need model_dir (the base model they were trained on)")
        if self.device == "cuda" and self.pulse.num_gpus == 0:
            raise ValueError(
                "device cuda needs pulse.num_gpus >= 1 (or auto): Ray must reserve the GPU "
                "the replica uses"
            )
        return self

    def served_adapters(self) -> list[str]:
        return list(self.adapters)


def pulse_gpus(args: ServeArgs) -> float:
    """GPUs each PULSE replica reserves. ``auto``: none for ``device: cpu`` (a CPU replica
    holding a GPU would keep it from every other job); else one when the connected Ray
    cluster has a GPU, or this machine when Ray is not started yet
    (``serve.run(build_app(...))`` before ``ray.init``)."""
    if args.pulse.num_gpus != "auto":
        return float(args.pulse.num_gpus)
    if args.device == "cpu":
        return 0.0
    import ray

    if ray.is_initialized():
        return args.pulse.gpus(float(ray.cluster_resources().get("GPU", 0.0)))
    import torch

    return args.pulse.gpus(float(torch.cuda.device_count()))


def absolute_paths(args: ServeArgs, base: str | None = None) -> ServeArgs:
    """``args`` with ``model_dir`` and every adapter directory absolute against ``base``
    (default: the working directory), as ``ecgvlm.config.absolute_path`` makes them."""
    from ecgvlm.config import absolute_path

    model_dir = None if args.model_dir is None else absolute_path(args.model_dir, base)
    adapters = {name: absolute_path(path, base) for name, path in args.adapters.items()}
    samples = None if args.samples_dir is None else absolute_path(args.samples_dir, base)
    report = None if args.report_dir is None else absolute_path(args.report_dir, base)
    return args.model_copy(update={"model_dir": model_dir, "adapters": adapters,
                                   "samples_dir": samples, "report_dir": report})


def model_fingerprints(args: ServeArgs) -> dict[str, str]:
    """Model id -> a fingerprint of the weights it answers with, for ``/v1/models``:
    ``ecgvlm.storage.fingerprint`` of ``model_dir`` for ``pulse``, of the base and the
    adapter together for each ``pulse-lora`` model. An evaluation resumed against the
    endpoint compares them with those its stored answers came from, so a retrained adapter
    served under the same name is not mixed with the old one's answers. Reads a few MB per
    checkpoint shard (its first and last MiB)."""
    import hashlib

    from ecgvlm import storage
    from ecgvlm.serving.limits import LORA_MODEL, PULSE_MODEL

    if args.model_dir is None:
        return {}
    base = storage.fingerprint(args.model_dir)
    out = {PULSE_MODEL: base}
    for i, name in enumerate(args.served_adapters()):
        both = f"{base}:{storage.fingerprint(args.adapters[name])}".encode()
        out[f"{LORA_MODEL}:{name}"] = hashlib.blake2b(both, digest_size=8).hexdigest()
        if i == 0:
            out[LORA_MODEL] = out[f"{LORA_MODEL}:{name}"]
    return out


def check_paths(args: ServeArgs) -> None:
    """Raise ValueError naming the field when ``model_dir``, ``report_dir`` or an adapter is
    not a directory (``model_dir`` and adapters may be URIs of an object store: a prefix
    with files under it; the reading room's ``report_dir`` is a local folder), when
    ``model_dir`` is no PULSE checkpoint (``ecgvlm.model.check_model_dir``), an adapter no
    PEFT folder (``ecgvlm.adapter.check_peft_dir``) or ``report_dir`` holds no report.

    Checked where the app is built (on the cluster for ``serve deploy``), before any replica
    starts. On a cluster of two or more nodes a plain local ``model_dir`` or adapter path
    raises ``ecgvlm.storage.StorageError`` (``storage.check_shared``).
    """
    from ecgvlm import storage
    from ecgvlm.adapter import check_peft_dir
    from ecgvlm.model import check_model_dir

    if args.report_dir is not None and storage.local_path(args.report_dir) is None:
        raise ValueError(f"report_dir: {args.report_dir} must be a local folder")
    paths = [("model_dir", args.model_dir), ("report_dir", args.report_dir)]
    paths += [(f"adapters.{n}", p) for n, p in args.adapters.items()]
    # Replicas may start on any node of a cluster: their weights must be on shared storage.
    storage.check_shared({what: path for what, path in paths if what != "report_dir"})
    for what, path in paths:
        if path is not None and not storage.is_dir(path):
            raise ValueError(f"{what}: {path} is not a directory")
    # What each folder must hold, so that the replica that loads it does not fail after Ray,
    # Serve and the controller have started (a traceback ending in "Deploying application
    # ecgvlm failed").
    if args.model_dir is not None:
        check_model_dir(args.model_dir)
    if args.report_dir is not None and not storage.is_file(storage.join(args.report_dir,
                                                                        "report.md")):
        raise ValueError(f"report_dir: {args.report_dir} holds no report.md: give an "
                         "evaluation's output_dir (README step 7 writes runs/eval_demo)")
    for name, path in args.adapters.items():
        try:
            check_peft_dir(path)
        except ValueError as e:
            raise ValueError(f"adapters.{name}: {e}") from e


class ReplicaStartError(RuntimeError):
    """Serve gave up starting a deployment: its replicas' constructor kept raising."""


_FRAME = re.compile(r'\s*File "([^"]+)", line (\d+), in (\S+)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def replica_start_error(status: Any, app_name: str) -> ReplicaStartError | None:
    """Why ``app_name`` did not start, in one line, from ``serve.status()``: each failed
    deployment's exception and the innermost frame it was raised in. None when none failed.

    ``serve.run`` raises only "Deploying application ... failed"; Serve keeps the replica's
    traceback in the deployment's message (and in the private head's logs, which
    ``ecgvlm serve`` removes as it exits). A checkpoint that passes :func:`check_paths` but
    does not load (a truncated shard, no memory left on the GPU) ends here.
    """
    app = status.applications.get(app_name)
    if app is None:
        return None
    causes = []
    for name, deployment in app.deployments.items():
        if deployment.status != "DEPLOY_FAILED":
            continue
        lines = [ln for ln in _ANSI.sub("", deployment.message).splitlines() if ln.strip()]
        frames = [m for m in map(_FRAME.match, lines) if m]
        cause = f"{name}: {lines[-1].strip() if lines else 'no error recorded'}"
        if frames:
            path, line, function = frames[-1].groups()
            cause += f" (in {function}, {Path(path).name}:{line})"
        causes.append(cause)
    if not causes:
        return None
    return ReplicaStartError(f"application {app_name!r} did not start, its replicas failed: "
                             + "; ".join(causes))


def parse_adapter_specs(specs: Iterable[str]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` (the CLI's ``--adapter``) as an ordered name -> dir mapping."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter must look like NAME=DIR, got {spec!r}")
        if name in adapters:
            raise ValueError(f"--adapter {name} is given twice")
        adapters[name] = path
    return adapters

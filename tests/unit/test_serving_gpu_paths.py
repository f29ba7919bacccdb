"""What differs on a GPU, simulated on CPU: the CLIP layer that feeds the projector, logits
kept at prefill, prompts past the context, memory budgets from PULSE-7B's real shapes, an
out-of-memory error inside a batch, readiness during a long batch, device and dtype choice,
and the attention kernel."""

from __future__ import annotations

import io
import threading

import pytest
import torch

from ecgvlm import serving as sv
from ecgvlm.infer import (
    MemoryCosts,
    OutOfMemory,
    PromptTooLongError,
    batch_tokens,
    generate,
    generate_batched,
    max_batch_tokens_for,
    memory_costs,
    plan_batches,
)
from ecgvlm.model import load_pulse
from ecgvlm.prompt import build_prompt
from ecgvlm.serving.pulse import resolve_device, resolve_dtype
from tests.unit.pulse_support import llava_v1, noise_image, one_torch_thread  # noqa: F401

GiB = 1024**3
MiB = 1024**2


@pytest.fixture(scope="module")
def tiny(tiny_pulse_dir):
    return load_pulse(tiny_pulse_dir)


def _png(size=(96, 48), seed=0) -> bytes:
    buf = io.BytesIO()
    noise_image(*size, seed).save(buf, format="PNG")
    return buf.getvalue()


# -- 1. the CLIP layer ------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["output_hidden_states", "output_attentions"])
def test_answers_do_not_change_after_a_forward_with_extra_outputs(tiny_pulse_dir, extra):
    # A fresh model per case: the bug this guards against changed a process for good.
    model, processor = load_pulse(tiny_pulse_dir, attn_implementation="eager")
    batch = processor([llava_v1("Rhythm?")], [noise_image(200, 90, 0)])
    tower = model.model.vision_tower
    tiles = batch["pixel_values"][0, :2]
    with torch.no_grad():
        # What LLaVA takes: CLIP's own hidden_states[select_layer], on a tower never run inside
        # the whole model yet.
        reference = tower.vision_tower(tiles, output_hidden_states=True).hidden_states[
            tower.select_layer
        ][:, 1:]
        before = model(**batch).logits[0, -1]
        model(**batch, **{extra: True})
        after = model(**batch).logits[0, -1]
        features = tower(tiles)
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_tower_runs_only_the_layers_it_selects(tiny):
    model, _ = tiny
    tower = model.model.vision_tower
    n_layers = tower.vision_tower.config.num_hidden_layers
    assert tower.select_layer == -2 and tower.layers_run == n_layers - 1
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i))
             for i, layer in enumerate(tower._clip_parts()[2])]
    try:
        with torch.no_grad():
            tower(torch.zeros(1, 3, 56, 56))
    finally:
        for h in hooks:
            h.remove()
    assert calls == list(range(n_layers - 1))


# -- 5. logits at prefill ---------------------------------------------------------------------


def test_generation_computes_logits_for_the_last_position_only(tiny):
    model, processor = tiny
    widths = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    try:
        generate(model, processor, [llava_v1("Axis?"), llava_v1("Rate?")],
                 [noise_image(200, 90, 0), noise_image(64, 64, 1)], max_new_tokens=3)
    finally:
        hook.remove()
    # Prefill over the whole prompt (dozens of positions) projects one position, as each step.
    assert widths and all(w == 1 for w in widths)


# -- 6. prompts past the context ----------------------------------------------------------------


def test_prompts_past_the_context_are_refused_not_cut(tiny):
    model, processor = tiny
    image = noise_image(200, 90, 0)
    long_text = " ".join(["sinus"] * 5000)
    with pytest.raises(PromptTooLongError, match=r"prompt 1 takes \d+ tokens.*at most 4096") as e:
        generate(model, processor, [llava_v1("Rate?"), llava_v1(long_text)], [image, image])
    assert e.value.row == 1 and not e.value.new_tokens_at_fault
    # Fits alone, but not with the answer asked for: max_position_embeddings is 4096 too.
    with pytest.raises(PromptTooLongError, match="max_position_embeddings 4096; ask for at most"):
        generate(model, processor, [llava_v1("Rate?")], [image], max_new_tokens=4096)


def test_the_runner_answers_an_overlong_prompt_with_a_400_and_the_rest_normally(tiny_pulse_dir):
    runner = sv.PulseRunner(str(tiny_pulse_dir), device="cpu")
    png = _png()
    ok = sv.GenerateRequest(build_prompt("Which?", ["x", "y"]), png, None, 4)
    too_long = sv.GenerateRequest(build_prompt(" ".join(["sinus"] * 5000), ["x", "y"]), png,
                                  None, 4)
    no_room = sv.GenerateRequest(ok.prompt, png, None, 4090)
    results = runner.generate([ok, too_long, no_room])
    assert isinstance(results[0], sv.GenerateResult) and results[0].completion_tokens >= 1
    assert isinstance(results[1], sv.ApiError) and results[1].status == 400
    assert results[1].param == "messages" and results[1].code == "context_length_exceeded"
    assert results[1].message.startswith("messages: the prompt takes")
    assert isinstance(results[2], sv.ApiError) and results[2].param == "max_tokens"
    assert "ask for at most" in results[2].message
    assert results[0] == runner.generate([ok])[0]


# -- 3. memory budgets from PULSE-7B's shapes ------------------------------------------------


@pytest.fixture(scope="module")
def pulse_7b_on_meta():
    """PULSE-7B's exact shapes in bfloat16 on the meta device: no memory, real sizes."""
    from transformers import CLIPVisionConfig

    from ecgvlm.model import PULSE_7B_CONFIG
    from ecgvlm.model.checkpoint import KNOWN_VISION_TOWERS
    from ecgvlm.model.pulse import build_pulse

    vision = CLIPVisionConfig(**KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"])
    return build_pulse(PULSE_7B_CONFIG, vision, dtype=torch.bfloat16, device="meta")


def test_memory_costs_from_pulse_7b_shapes(pulse_7b_on_meta):
    model = pulse_7b_on_meta
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 13.0 * GiB < weights_bytes < 13.4 * GiB
    costs = memory_costs(model)
    assert costs.kv_bytes_per_token == 0.5 * MiB  # 2 x 32 layers x 32 heads x 128 x 2 bytes
    # A printout (2,880 image features), ~120 text tokens and 256 new ones: ~1.6 GiB of cache.
    typical = 2880 + 120
    assert batch_tokens([typical], 256) * costs.kv_bytes_per_token == pytest.approx(1.59 * GiB,
                                                                                    rel=0.01)
    # A 24 GB card: what is left after the weights does not hold 8 such requests at once; the
    # plan splits them into batches that each fit, in arrival order.
    budget = max_batch_tokens_for(24 * 10**9 - weights_bytes, costs)
    plan = plan_batches([typical] * 8, 256, budget)
    assert len(plan) > 1 and sorted(i for b in plan for i in b) == list(range(8))
    assert all(batch_tokens([typical] * len(b), 256) <= budget for b in plan)
    assert [i for b in plan for i in b] == list(range(8))
    # An 80 GB card holds all eight in one call.
    assert len(plan_batches([typical] * 8, 256, max_batch_tokens_for(80 * 10**9 - weights_bytes,
                                                                     costs))) == 1


def test_plan_batches_pads_to_the_longest_and_gives_an_oversized_prompt_its_own_batch():
    assert plan_batches([10, 10, 10], 5, None) == [[0, 1, 2]]
    # Rows of 10 then one of 40: that row makes the batch 3 x 45 = 135 tokens, over 100.
    assert plan_batches([10, 10, 40, 10], 5, 100) == [[0, 1], [2, 3]]
    assert plan_batches([500, 10], 5, 100) == [[0], [1]]
    with pytest.raises(ValueError, match="headroom_fraction"):
        max_batch_tokens_for(GiB, MemoryCosts(1, 1), headroom_fraction=1.5)


# -- 3. out of memory ---------------------------------------------------------------------------


def _inject_oom(model, when):
    """Make the PulseModel's generate raise CUDA's out-of-memory error when ``when(rows)``."""
    from ecgvlm.infer import _unwrap

    base = _unwrap(model)
    real = base.generate
    calls = []

    def generate_or_oom(*args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        calls.append(rows)
        if when(rows):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(*args, **kwargs)

    base.generate = generate_or_oom
    return calls


def test_an_oom_batch_is_retried_in_halves_and_a_prompt_that_fails_alone_gets_a_503(
    tiny_pulse_dir, monkeypatch
):
    from ecgvlm import infer

    freed = []
    monkeypatch.setattr(infer, "free_device_memory", lambda: freed.append(1))
    runner = sv.PulseRunner(str(tiny_pulse_dir), device="cpu")
    prompt = build_prompt("Which?", ["x", "y"])
    reqs = [sv.GenerateRequest(prompt, _png(seed=i), None, 3) for i in range(3)]
    expected = [runner.generate([r])[0] for r in reqs]

    calls = _inject_oom(runner.model, lambda rows: rows > 1)
    assert runner.generate(reqs) == expected  # 3 -> OOM; 1 and 2 -> OOM on the 2; 1, 1
    assert calls == [3, 1, 2, 1, 1] and len(freed) == 2
    assert runner.stats()["out_of_memory_events"] == 0

    calls = _inject_oom(runner.model, lambda rows: True)
    failed = runner.generate(reqs[:2])
    assert calls == [2, 1, 1]
    for error in failed:
        assert isinstance(error, sv.ApiError) and error.status == 503
        assert error.code == "out_of_memory" and error.headers() == {"Retry-After": "2"}
    assert runner.stats()["out_of_memory_events"] == 2
    # The error crosses Ray's process boundary with its Retry-After.
    import pickle

    assert pickle.loads(pickle.dumps(failed[0])).headers() == {"Retry-After": "2"}


def test_generate_batched_splits_by_the_token_budget_and_matches_one_call(tiny):
    model, processor = tiny
    prompts = [llava_v1("Rate?"), llava_v1("Axis?"), llava_v1("Rhythm?")]
    images = [noise_image(96, 48, i) for i in range(3)]
    alone = generate(model, processor, prompts, images, max_new_tokens=3)
    from ecgvlm.infer import prompt_tokens

    longest = max(prompt_tokens(model, processor, prompts, images))
    calls = _inject_oom(model, lambda rows: False)
    try:
        out = generate_batched(model, processor, prompts, images, max_new_tokens=3,
                               max_batch_tokens=2 * (longest + 3))
    finally:
        del model.generate  # the instance attribute; the class method again
    assert calls == [2, 1] and out == alone
    assert not any(isinstance(g, OutOfMemory) for g in out)


# -- 4. readiness during a long batch ------------------------------------------------------------


def test_stats_answer_while_a_batch_holds_the_model(tiny_pulse_dir):
    runner = sv.PulseRunner(str(tiny_pulse_dir), device="cpu")
    holding, release = threading.Event(), threading.Event()

    def long_batch():
        with runner._lock:  # what generate holds for a whole batch
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=long_batch)
    worker.start()
    try:
        assert holding.wait(10)
        answered = []
        reader = threading.Thread(target=lambda: answered.append(runner.stats()))
        reader.start()
        reader.join(5)
        assert answered, "stats() waited for the generation lock"
        assert answered[0]["device"] == "cpu" and answered[0]["dtype"] == "float32"
        assert answered[0]["attn_implementation"] == "sdpa"
        assert answered[0]["max_batch_tokens"] is None  # no budget on CPU unless configured
    finally:
        release.set()
        worker.join()


# -- 2. device, dtype, GPUs ---------------------------------------------------------------------


def test_auto_device_uses_only_a_gpu_ray_reserved(caplog):
    assert resolve_device("auto", cuda_available=True, reserved_gpu_ids=["0"]) == "cuda"
    assert resolve_device("auto", cuda_available=True, reserved_gpu_ids=None) == "cuda"
    with caplog.at_level("WARNING", logger="ray.serve"):
        assert resolve_device("auto", cuda_available=True, reserved_gpu_ids=[]) == "cpu"
    assert "reserved none" in caplog.text and "num_gpus" in caplog.text
    assert resolve_device("auto", cuda_available=False, reserved_gpu_ids=None) == "cpu"
    assert resolve_device("cpu", cuda_available=True, reserved_gpu_ids=[]) == "cpu"
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda", cuda_available=False, reserved_gpu_ids=None)
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("float16", "cuda") == "float16"


def test_serve_args_reserve_a_gpu_for_pulse_when_the_cluster_has_one(monkeypatch):
    args = sv.ServeArgs(model_dir="m")
    assert args.dtype == "auto" and args.pulse.num_gpus == "auto"
    assert args.pulse.gpus(4.0) == 1.0 and args.pulse.gpus(0.0) == 0.0
    assert args.pulse.deployment_options(num_gpus=1.0)["ray_actor_options"]["num_gpus"] == 1.0
    # A YAML pulse block that does not name num_gpus keeps auto.
    assert sv.ServeArgs(model_dir="m", pulse={"num_cpus": 0.5}).pulse.num_gpus == "auto"
    assert sv.ServeArgs(model_dir="m", pulse={"num_gpus": 2}).pulse.gpus(8.0) == 2.0
    # Connected to Ray, auto counts the cluster's GPUs (simulated: a head without GPUs and
    # a worker with four, then a cluster without any).
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 4.0})
    assert sv.pulse_gpus(args) == 1.0
    assert sv.pulse_gpus(sv.ServeArgs(model_dir="m", device="cpu")) == 0.0
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0})
    assert sv.pulse_gpus(args) == 0.0
    # Without Ray started, it counts this machine's (simulated: 2, then none).
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sv.pulse_gpus(args) == 1.0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert sv.pulse_gpus(args) == 0.0
    with pytest.raises(ValueError, match="device cuda needs pulse.num_gpus"):
        sv.ServeArgs(model_dir="m", device="cuda", pulse={"num_gpus": 0})
    with pytest.raises(ValueError, match="num_gpus must be >= 0 or auto"):
        sv.ServeArgs(model_dir="m", pulse={"num_gpus": -1})
    with pytest.raises(ValueError):
        sv.ServeArgs(model_dir="m", attn_implementation="flash")


def test_cli_serve_refuses_cuda_without_a_reserved_gpu_before_starting_ray(tmp_path, capsys):
    from ecgvlm.cli import main

    assert main(["serve", "--model-dir", str(tmp_path), "--device", "cuda",
                 "--num-gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert "device cuda needs pulse.num_gpus" in err and "Traceback" not in err


# -- 7. the attention kernel ---------------------------------------------------------------------


def test_attention_implementation_is_a_setting_and_reported(tiny_pulse_dir, tiny):
    sdpa_model, processor = tiny
    eager, _ = load_pulse(tiny_pulse_dir, attn_implementation="eager")
    assert sdpa_model.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    assert eager.model.vision_tower.vision_tower.config._attn_implementation == "eager"
    batch = processor([llava_v1("Rate?")], [noise_image(96, 48, 0)])
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits, sdpa_model(**batch).logits,
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="flash-attn"):
        load_pulse(tiny_pulse_dir, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        load_pulse(tiny_pulse_dir, attn_implementation="flash")


def test_the_endpoint_sends_retry_after_with_an_out_of_memory_503():
    import asyncio

    from serve.app import _api_error

    error = sv.ApiError(503, "out of device memory", "service_unavailable",
                        code="out_of_memory", retry_after_s=2.0)
    response = asyncio.run(_api_error(None, error))
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert asyncio.run(_api_error(None, sv.bad_request("x"))).headers.get("retry-after") is None

"""Unit tests of ecgvlm.serving: schemas, limits, errors, images, signals, args (no Ray)."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ecgvlm import serving as sv

LIMITS = sv.ServeLimits()


def _png(size: tuple[int, int] = (32, 24), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def _chat(**overrides) -> bytes:
    body = {"model": "pulse", "messages": [{"role": "user", "content": "hi"}]}
    body.update(overrides)
    return json.dumps(body).encode()


def _error(fn, *args, **kwargs) -> sv.ApiError:
    with pytest.raises(sv.ApiError) as info:
        fn(*args, **kwargs)
    return info.value


# --- errors and chat requests ----------------------------------------------------------------


def test_error_json_has_openai_shape():
    e = sv.bad_request("bad thing", param="messages", code="x")
    assert e.status == 400
    assert e.to_json() == {
        "error": {"message": "bad thing", "type": "invalid_request_error", "param": "messages",
                  "code": "x"}
    }


def test_api_error_survives_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(sv.ApiError(429, "slow down", "rate_limit_error", None, "c")))
    assert (e.status, e.message, e.type, e.code) == (429, "slow down", "rate_limit_error", "c")


def test_parse_chat_request_accepts_text_and_image_parts_and_ignores_extras():
    url = sv.image_data_url(_png())
    req = sv.parse_chat_request(_chat(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "what?"}]}],
        user="someone", temperature=0.2, max_tokens=7, seed=3,
    ), LIMITS)
    assert req.temperature == 0.2 and req.max_tokens == 7 and req.seed == 3
    images = sv.collect_images(req, LIMITS)
    assert [(i.format, i.size_px) for i in images] == [("PNG", (32, 24))]


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (_chat(messages=[]), "messages"),
        (_chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (_chat(messages=[{"role": "user", "content": [{"type": "image_url",
                                                         "image_url": {}}]}]),
         "messages[0].content[0].image_url.url"),
        (_chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
         "messages[0].content[0]"),
        (_chat(temperature=5), "temperature"),
        (_chat(max_tokens=0), "max_tokens"),
        (_chat(max_tokens=sv.MAX_TOKENS + 1), "max_tokens"),
        (_chat(n=2), "n"),
        # Streaming and log-probabilities: each bad field named.
        (_chat(stream="yes"), "stream"),
        (_chat(stream=True, n=2), "n"),
        (_chat(stream_options={"include_usage": True}), "stream_options"),
        (_chat(stream=True, stream_options={"include_usage": "yes"}),
         "stream_options.include_usage"),
        (_chat(stream=True, stream_options=[1]), "stream_options"),
        (_chat(logprobs="true"), "logprobs"),
        (_chat(logprobs=True, top_logprobs="3"), "top_logprobs"),
        (_chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
        (_chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        (_chat(top_logprobs=2), "top_logprobs"),
    ],
)
def test_bad_chat_requests_are_400s_naming_the_field(body, param):
    e = _error(sv.parse_chat_request, body, LIMITS)
    assert e.status == 400
    assert e.param == param
    if param:
        assert param in e.message


def test_text_and_image_count_limits():
    limits = sv.ServeLimits(max_text_chars=10, max_images_per_request=1)
    assert _error(sv.parse_chat_request, _chat(messages=[{"role": "user", "content": "x" * 11}]),
                  limits).param == "messages"
    url = sv.image_data_url(_png())
    part = {"type": "image_url", "image_url": {"url": url}}
    e = _error(sv.parse_chat_request,
               _chat(messages=[{"role": "user", "content": [part, part]}]), limits)
    assert "2 images" in e.message


def test_body_size_limit_is_413():
    e = _error(sv.check_body_size, LIMITS.max_body_bytes + 1, LIMITS)
    assert e.status == 413 and str(LIMITS.max_body_bytes) in e.message


# --- models ---------------------------------------------------------------------------------


def test_resolve_model_routes():
    adapters = ["cpsc", "chapman"]
    assert sv.resolve_model("pulse", adapters) == sv.ModelRoute("pulse", "pulse", None)
    assert sv.resolve_model("pulse-lora", adapters).adapter == "cpsc"
    assert sv.resolve_model("pulse-lora:chapman", adapters).adapter == "chapman"
    assert sv.resolve_model("gpt-4o", adapters).kind == "proxy"
    for name in ("pulse-lora:nope", "llama", ""):
        e = _error(sv.resolve_model, name, adapters)
        assert e.status == 404 and e.code == "model_not_found" and "pulse-lora:chapman" in e.message
    # Without adapters there is no pulse-lora.
    assert _error(sv.resolve_model, "pulse-lora", []).status == 404


# --- images ---------------------------------------------------------------------------------


def test_decode_data_url_png_and_jpeg():
    png = sv.decode_data_url(sv.image_data_url(_png()), LIMITS.max_image_pixels, "p")
    assert png.format == "PNG"
    jpeg = sv.image_data_url(_png(fmt="JPEG"), "image/jpeg")
    assert sv.decode_data_url(jpeg, LIMITS.max_image_pixels, "p").size_px == (32, 24)


@pytest.mark.parametrize(
    "url, code",
    [
        ("https://example.com/ecg.png", "invalid_image_url"),
        ("data:image/png;base64,@@@not-base64@@@", "invalid_base64"),
        ("data:image/gif;base64," + base64.b64encode(b"GIF89a").decode(), "invalid_image_url"),
        ("data:image/png," + "abc", "invalid_image_url"),
        ("data:image/png;base64," + base64.b64encode(b"just some text\n").decode(),
         "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(_png()[:60]).decode(), "invalid_image"),
    ],
)
def test_bad_images_are_400s(url, code):
    param = "messages[0].content[0].image_url.url"
    e = _error(sv.decode_data_url, url, LIMITS.max_image_pixels, param)
    assert e.status == 400 and e.code == code
    assert e.param == "messages[0].content[0].image_url.url"


def test_image_over_pixel_limit_is_refused_before_decoding():
    e = _error(sv.decode_data_url, sv.image_data_url(_png((200, 100))), 100 * 100, "img")
    assert e.status == 400 and e.code == "image_too_large" and "200x100" in e.message


def test_bmp_is_refused_by_format():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="BMP")
    e = _error(sv.check_image_bytes, buf.getvalue(), LIMITS.max_image_pixels, "img")
    assert "BMP" in e.message


# --- signals and interpret --------------------------------------------------------------------


def _interpret(**overrides) -> dict:
    rng = np.random.default_rng(0)
    body = {
        "samples": (rng.normal(size=(500, 2)) * 0.1).tolist(), "fs_hz": 250.0,
        "leads": ["I", "II"], "options": ["Sinus rhythm", "Atrial fibrillation"],
    }
    body.update(overrides)
    return body


def test_record_from_json_builds_an_ecg_record():
    req = sv.parse_model(sv.InterpretJsonRequest, _interpret())
    rec = sv.record_from_json(req, LIMITS)
    assert rec.signal_mv.shape == (500, 2) and rec.leads == ("I", "II") and rec.fs_hz == 250.0
    question, options = sv.check_query(req, LIMITS)
    assert question == sv.DEFAULT_QUESTION and options == ["Sinus rhythm", "Atrial fibrillation"]


@pytest.mark.parametrize(
    "overrides, param, code",
    [
        ({"samples": [[0.1, 0.2, 0.3]] * 500}, "samples", "invalid_shape"),
        ({"samples": [[0.1, 0.2]] * 499 + [[0.1]]}, "samples", "invalid_shape"),
        ({"samples": [[0.1, float("nan")]] * 500}, "samples", "non_finite"),
        ({"samples": [[0.1, 0.2]] * 10}, "samples", "invalid_duration"),
        ({"samples": [[1000.0, 0.2]] * 500}, "samples", "invalid_units"),
        ({"fs_hz": 1.0}, "fs_hz", None),
        ({"leads": ["I", "I"]}, "leads", None),
    ],
)
def test_bad_signals_are_400s_naming_the_field(overrides, param, code):
    req = sv.parse_model(sv.InterpretJsonRequest, _interpret(**overrides))
    e = _error(sv.record_from_json, req, LIMITS)
    assert e.status == 400 and e.param == param
    if code:
        assert e.code == code


@pytest.mark.parametrize(
    "drop, extra, param",
    [
        ("fs_hz", {}, "fs_hz"),
        ("samples", {}, "samples"),
        ("leads", {}, "leads"),
        (None, {"sampels": []}, "sampels"),
        (None, {"options": ["only one"]}, "options"),
        (None, {"samples": "abc"}, "samples"),
    ],
)
def test_interpret_schema_errors_name_the_field(drop, extra, param):
    body = _interpret(**extra)
    if drop:
        del body[drop]
    e = _error(sv.parse_model, sv.InterpretJsonRequest, body)
    assert e.status == 400 and e.param == param


def test_options_are_required():
    req = sv.parse_model(sv.InterpretJsonRequest, _interpret(options=None))
    assert _error(sv.check_query, req, LIMITS).param == "options"


def test_nan_from_json_text_is_caught():
    # Python's json accepts the NaN literal; the signal check must still refuse it.
    rows = ", ".join(["[NaN, 0.0]"] + ["[0.0, 0.1]"] * 499)
    text = '{"samples": [' + rows + '], "fs_hz": 250, "leads": ["I", "II"]}'
    req = sv.parse_model(sv.InterpretJsonRequest, sv.parse_json_body(text.encode()))
    e = _error(sv.record_from_json, req, LIMITS)
    assert e.status == 400 and e.code == "non_finite" and "sample 0 of lead 'I'" in e.message


@pytest.mark.parametrize(
    "name, ok",
    [("100.hea", True), ("A0001.mat", True), ("../etc/passwd.hea", True), (".hea", False),
     ("x.exe", False), ("a b.dat", False), (None, False)],
)
def test_upload_names(name, ok):
    if ok:
        assert sv.safe_upload_name(name, "files").endswith((".hea", ".dat", ".mat"))
        assert "/" not in sv.safe_upload_name(name, "files")
    else:
        assert _error(sv.safe_upload_name, name, "files").param == "files"


def _mitdb_upload(samples_dir: Path) -> dict[str, bytes]:
    return {f"106{ext}": (samples_dir / "mitdb" / f"106{ext}").read_bytes()
            for ext in (".hea", ".dat", ".atr")}


def test_a_30_min_mitdb_upload_is_drawn_as_a_window(samples_dir):
    files = _mitdb_upload(samples_dir)
    first = sv.record_from_wfdb_upload(files, LIMITS)  # no window asked: the first 10 s
    assert first.start_s == 0.0 and first.duration_s == sv.DEFAULT_WINDOW_S
    later = sv.record_from_wfdb_upload(files, LIMITS, start_s=1200.0)
    assert later.start_s == 1200.0 and later.n_samples == round(sv.DEFAULT_WINDOW_S * 360)
    tail = sv.record_from_wfdb_upload(files, LIMITS, start_s=1800.0)  # cut at the end (1805.6 s)
    assert tail.start_s == 1800.0 and abs(tail.duration_s - 5.56) < 0.01
    assert sv.record_from_wfdb_upload(files, LIMITS, start_s=60.0, duration_s=30.0).duration_s == 30.0
    # The window's samples are the recording's own.
    full = sv.record_from_wfdb_upload(files, LIMITS, start_s=0.0, duration_s=120.0)
    np.testing.assert_array_equal(later.signal_mv[:5], sv.record_from_wfdb_upload(
        files, LIMITS, start_s=1200.0, duration_s=1.0).signal_mv[:5])
    np.testing.assert_array_equal(first.signal_mv, full.signal_mv[: first.n_samples])


@pytest.mark.parametrize("start_s, duration_s, param, code", [
    (1900.0, None, "start_s", "invalid_window"),        # past the end of the recording
    (0.0, 600.0, "files", "invalid_duration"),           # a window over the duration limit
    (1805.0, None, "files", "invalid_duration"),         # a window under 1 s at the very end
])
def test_bad_windows_are_400s_naming_the_field(samples_dir, start_s, duration_s, param, code):
    e = _error(sv.record_from_wfdb_upload, _mitdb_upload(samples_dir), LIMITS, None, start_s,
               duration_s)
    assert e.status == 400 and e.param == param and e.code == code, e.message


def test_json_signals_take_the_same_window_fields():
    rng = np.random.default_rng(1)
    long_rows = (rng.normal(size=(250 * 200, 1)) * 0.1).tolist()  # 200 s at 250 Hz
    req = sv.parse_model(sv.InterpretJsonRequest, _interpret(samples=long_rows, leads=["II"]))
    rec = sv.record_from_json(req, LIMITS)
    assert rec.duration_s == sv.DEFAULT_WINDOW_S and rec.start_s == 0.0
    req = sv.parse_model(sv.InterpretJsonRequest, _interpret(start_s=0.5))  # a 2 s signal
    rec = sv.record_from_json(req, LIMITS)
    assert rec.start_s == 0.5 and rec.n_samples == 375
    e = _error(sv.parse_model, sv.InterpretJsonRequest, _interpret(start_s=-1))
    assert e.param == "start_s"
    out = sv.interpret_response("pulse", "B", "q?", ["x", "y"], {}, window_s=(0.5, 1.5))
    assert (out["start_s"], out["duration_s"]) == (0.5, 1.5)


def test_interpret_response_splits_answer_and_explanation():
    options = ["Sinus rhythm", "Atrial fibrillation", "Left bundle branch block"]
    out = sv.interpret_response("pulse", "The answer is B. Irregularly irregular RR intervals.",
                                "q?", options, {"prompt_tokens": 3}, png=b"\x89PNG")
    assert out["answer_letter"] == "B" and out["finding"] == "Atrial fibrillation"
    assert out["explanation"] == "Irregularly irregular RR intervals."
    assert base64.b64decode(out["image_png_base64"]) == b"\x89PNG"
    unparsed = sv.interpret_response("pulse", "no idea", "q?", options, {})
    assert unparsed["answer_letter"] is None and unparsed["finding"] is None
    assert "image_png_base64" not in unparsed


# --- proxy helpers, batching groups, args ---------------------------------------------------


def test_backoff_grows_with_jitter_and_is_capped():
    rng = random.Random(0)
    delays = [sv.backoff_delay_s(a, 0.5, 4.0, rng) for a in range(6)]
    for a, d in enumerate(delays):
        step = min(4.0, 0.5 * 2**a)
        assert step / 2 <= d <= step
    assert sv.backoff_delay_s(0, 0.5, 4.0, rng, retry_after_s=3.0) == 3.0
    assert sv.backoff_delay_s(0, 0.5, 4.0, rng, retry_after_s=60.0) == 4.0


def test_proxy_without_key_is_unavailable_and_never_shows_a_key(monkeypatch):
    monkeypatch.delenv("ECGVLM_TEST_KEY", raising=False)
    settings = sv.OpenAISettings(api_key_env="ECGVLM_TEST_KEY")
    proxy = sv.OpenAIProxy(settings)
    assert not proxy.available and "ECGVLM_TEST_KEY" in proxy.unavailable_reason
    monkeypatch.setenv("ECGVLM_TEST_KEY", "sk-secret-123")
    proxy = sv.OpenAIProxy(settings)
    assert proxy.available and "sk-secret-123" not in repr(proxy)


def test_group_requests_by_adapter_and_settings():
    reqs = [sv.GenerateRequest("p", None, a, 8, t) for a, t in
            [(None, 0.0), ("x", 0.0), (None, 0.0), ("y", 0.0), ("x", 0.0), ("x", 0.7)]]
    assert list(sv.group_requests(reqs).values()) == [[0, 2], [1, 4], [3], [5]]


def test_serve_args_validation():
    args = sv.ServeArgs.model_validate({
        "model_dir": "/m", "adapters": {"a": "/a", "b": "/b"},
        "pulse": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}, "num_gpus": 1},
    })
    opts = args.pulse.deployment_options()
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert args.served_adapters() == ["a", "b"]
    with pytest.raises(ValidationError, match="adapters"):
        sv.ServeArgs(model_dir="/m", adapters={"a:b": "/x"})
    with pytest.raises(ValidationError, match="model_dir"):
        sv.ServeArgs(adapters={"a": "/x"})
    with pytest.raises(ValidationError, match="min_replicas"):
        sv.AutoscalingArgs(min_replicas=3, max_replicas=1)
    with pytest.raises(ValidationError, match="max_batch_size"):
        sv.ServeArgs.model_validate({"batching": {"max_batch_size": 0}})
    with pytest.raises(ValidationError, match="extra"):
        sv.ServeArgs.model_validate({"modle_dir": "/m"})


def test_parse_adapter_specs():
    assert sv.parse_adapter_specs(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    for bad in (["a"], ["=x"], ["a=/x", "a=/y"]):
        with pytest.raises(ValueError, match="--adapter"):
            sv.parse_adapter_specs(bad)


def test_usage_counter():
    usage = sv.UsageCounter()
    usage.add("pulse", {"prompt_tokens": 5, "completion_tokens": 2})
    usage.add("pulse", error=True)
    assert usage.to_json() == {"pulse": {"requests": 2, "errors": 1, "prompt_tokens": 5,
                                         "completion_tokens": 2}}


# --- config file and CLI ----------------------------------------------------------------------


def test_serve_config_yaml_is_valid_serve_args():
    import yaml

    path = Path(__file__).resolve().parents[2] / "serve" / "config.yaml"
    text = path.read_text()
    assert text.startswith("#") and "serve run serve/config.yaml" in text.split("\n\n")[0]
    config = yaml.safe_load(text)
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    args = sv.ServeArgs.model_validate(app["args"])
    assert args.batching.max_batch_size >= 1 and args.openai.api_key_env == "OPENAI_API_KEY"


def test_cli_serve_refuses_a_missing_model_dir_before_starting_ray(tmp_path, capsys):
    from ecgvlm.cli import main

    assert main(["serve", "--model-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "model_dir" in err and "nope" in err
    assert main(["serve", "--model-dir", str(tmp_path), "--adapter", "broken"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


def test_cli_serve_names_a_folder_that_holds_no_model_or_adapter_before_starting_ray(
        tiny_pulse_dir, tmp_path, capsys):
    """Each of these once started Ray, Serve and a replica that failed three times, and ended
    in a traceback saying only "Deploying application ecgvlm failed"."""
    import shutil

    from ecgvlm.cli import main

    def error_of(*argv: str) -> str:
        assert main(["serve", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ecgvlm serve: error: ") and "\n" not in err, err
        return err.removeprefix("ecgvlm serve: error: ")

    prepared = tmp_path / "prepared"  # a folder, but not a model: the prepared data, say
    prepared.mkdir()
    assert error_of("--model-dir", str(prepared)) == (
        f"model_dir {prepared}: no config.json there; it must be a PULSE checkpoint folder "
        "(config.json, model.safetensors)")
    half = shutil.copytree(tiny_pulse_dir, tmp_path / "half")
    shard = max(half.glob("model-*.safetensors"))
    shard.unlink()  # a download cut short
    assert error_of("--model-dir", str(half)).startswith(f"model_dir {half}: {half} lacks 1 shard")
    model = ["--model-dir", str(tiny_pulse_dir)]
    # The training run's folder instead of the adapter it wrote.
    assert error_of(*model, "--adapter", f"demo={prepared}") == (
        f"adapters.demo: {prepared} is not a PEFT adapter folder: it has no adapter_config.json "
        "(a training run writes its adapter to the config's output_dir)")
    (prepared / "adapter_config.json").write_text("{}")
    assert error_of(*model, "--adapter", f"demo={prepared}") == (
        f"adapters.demo: {prepared} has adapter_config.json but no weights "
        "(adapter_model.safetensors or adapter_model.bin)")
    # The reading room's report view: the answer was a 404 in the browser, once started.
    assert error_of(*model, "--report-dir", str(prepared)) == (
        f"report_dir: {prepared} holds no report.md: give an evaluation's output_dir (README "
        "step 7 writes runs/eval_demo)")


def test_cli_serve_refuses_a_port_in_use_before_starting_ray(tiny_pulse_dir, capsys):
    import socket

    from ecgvlm.cli import main

    model = ["--model-dir", str(tiny_pulse_dir)]
    with socket.socket() as taken:  # another endpoint, say, already on the port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", *model, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    # One line, said before Ray's start (which would log, and take seconds).
    assert err.strip() == (f"ecgvlm serve: error: 127.0.0.1:{port} is in use: stop what listens "
                           "there (another `ecgvlm serve`?) or give another --port"), err
    assert main(["serve", *model, "--host", "no-such-host.invalid"]) == 2
    assert "cannot listen on no-such-host.invalid:8000" in capsys.readouterr().err


def test_cli_serve_on_a_public_address_without_a_token_warns(tiny_pulse_dir, capsys,
                                                             monkeypatch):
    """Served all the same (a trusted network is the user's call), with a warning first;
    the port is taken so that the command stops before Ray starts."""
    import socket

    from ecgvlm.cli import main

    monkeypatch.delenv("ECGVLM_API_TOKEN", raising=False)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model-dir", str(tiny_pulse_dir), "--port", str(port)]
        assert main([*argv, "--host", "0.0.0.0"]) == 2
        warning, error = capsys.readouterr().err.splitlines()
        assert warning == (
            "ecgvlm serve: warning: 0.0.0.0 is reachable from other machines and "
            f"ECGVLM_API_TOKEN is not set: anyone who reaches port {port} can use every model "
            "and upload records; set it to require a token")
        assert error.startswith("ecgvlm serve: error: 0.0.0.0:") and "is in use" in error
        monkeypatch.setenv("ECGVLM_API_TOKEN", "secret")
        assert main([*argv, "--host", "0.0.0.0"]) == 2
        assert "warning" not in capsys.readouterr().err
    from ecgvlm.cli import _is_loopback

    assert all(map(_is_loopback, ("127.0.0.1", "127.0.0.2", "localhost", "::1")))
    assert not any(map(_is_loopback, ("0.0.0.0", "::", "192.168.1.5", "ecg-box.local")))


# --- PulseRunner on the tiny checkpoint -------------------------------------------------------


def _adapter(model_dir: Path, out: Path, seed: int, bias: str = "lora_only") -> str:
    import torch

    from ecgvlm.model import attach_lora, load_pulse, save_adapter

    model, _ = load_pulse(model_dir)
    torch.manual_seed(seed)
    peft_model = attach_lora(model, bias=bias)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
            elif bias == "all" and name.endswith(".bias"):
                param.add_(0.1)
    return str(save_adapter(peft_model, out))


def test_pulse_runner_shares_base_weights_between_adapters(tiny_pulse_dir, tmp_path):
    adapters = {"a": _adapter(tiny_pulse_dir, tmp_path / "a", 1),
                "b": _adapter(tiny_pulse_dir, tmp_path / "b", 2)}
    runner = sv.PulseRunner(str(tiny_pulse_dir), adapters, device="cpu")
    png = _png((64, 32))
    from ecgvlm.prompt import build_prompt

    prompt = build_prompt("Which?", ["x", "y"])
    base_before = runner.generate([sv.GenerateRequest(prompt, png, None, 4)])[0]
    embed = runner.model.get_input_embeddings().weight.data_ptr()
    mixed = runner.generate([sv.GenerateRequest(prompt, png, a, 4) for a in ("a", None, "b", "a")])
    assert mixed[0] == mixed[3] and mixed[1] == base_before
    assert len({mixed[0].text, mixed[1].text, mixed[2].text}) == 3
    assert runner.model.get_input_embeddings().weight.data_ptr() == embed
    assert runner.stats()["base_loads"] == 1 and runner.loaded_adapters == ["a", "b"]
    runner.unload_adapter("a")
    assert runner.loaded_adapters == ["b"]
    runner.unload_adapter("b")  # the last adapter stays: PEFT needs one
    assert runner.loaded_adapters == ["b"]
    # An unloaded adapter comes back on demand with the same answer.
    assert runner.generate([sv.GenerateRequest(prompt, png, "a", 4)])[0] == mixed[0]
    assert runner.stats()["adapter_loads"] == {"a": 2, "b": 1}
    with pytest.raises(KeyError, match="unknown adapter"):
        runner.load_adapter("nope")


def test_images_prepared_on_arrival_answer_as_those_prepared_in_the_batch(tiny_pulse_dir):
    from dataclasses import replace

    from PIL import UnidentifiedImageError

    from ecgvlm.prompt import build_prompt

    runner = sv.PulseRunner(str(tiny_pulse_dir), device="cpu")
    prompt = build_prompt("Which?", ["x", "y"])
    # Three sizes: anyres cuts them into different numbers of tiles, padded in the batch.
    requests = [sv.GenerateRequest(prompt, _png(size), None, 4)
                for size in ((64, 32), (40, 40), (30, 90))]
    in_batch = runner.generate(requests)
    prepared = [runner.prepare_image(r.image) for r in requests]
    assert [p.size for p in prepared] == [(64, 32), (40, 40), (30, 90)]
    # A prepared image is taken as it is: the request's bytes are not read again.
    unreadable = [replace(r, image=b"not an image") for r in requests]
    assert runner.generate(unreadable, prepared=prepared) == in_batch
    assert runner.generate(requests, prepared=[None, prepared[1], None]) == in_batch
    choose = sv.GenerateRequest(prompt, requests[0].image, guided_choice=("A", "B"))
    assert (runner.generate([replace(choose, image=b"not an image")], prepared=prepared[:1])
            == runner.generate([choose]))
    with pytest.raises(UnidentifiedImageError):  # without its prepared image, the bytes are read
        runner.generate(unreadable[:1])


def test_adapters_that_train_biases_are_refused(tiny_pulse_dir, tmp_path):
    path = _adapter(tiny_pulse_dir, tmp_path / "biased", 3, bias="all")
    with pytest.raises(ValueError, match="bias"):
        sv.read_adapter(path)
    with pytest.raises(ValueError, match="not a readable PEFT adapter"):
        sv.read_adapter(str(tmp_path))


def test_measure_json_is_strict_json_and_survives_a_failing_measurer(samples_dir, monkeypatch):
    from ecgvlm.measure import measure_record
    from ecgvlm.signal import read_record

    record = read_record(samples_dir / "cpsc2018" / "A0002")
    out = sv.measure_json(record)
    json.dumps(out, allow_nan=False)  # what the endpoint's JSONResponse requires
    assert out["heart_rate_bpm"] == pytest.approx(measure_record(record).heart_rate_bpm)
    assert len(out["leads"]) == 12
    # P/T waves only when asked for: PR is then measured, else None with its reason.
    assert out["pr_ms"] is None and out["reasons"]["pr_ms"]
    with_waves = sv.measure_json(record, waves=True)
    assert with_waves["pr_ms"] == pytest.approx(measure_record(record).pr_ms)

    import ecgvlm.measure

    def broken(record):
        raise RuntimeError("a bug in the measurer")

    monkeypatch.setattr(ecgvlm.measure, "measure_record", lambda record, config: broken(record))
    assert sv.measure_json(record) == {"error": "measurement failed (RuntimeError)"}
    monkeypatch.setattr(ecgvlm.measure, "measure_record", lambda r, c: ecgvlm.measure.Measurements(
        "x", heart_rate_bpm=float("nan"), rr_mean_ms=float("inf")))
    out = sv.measure_json(record)
    assert out["heart_rate_bpm"] is None and out["rr_mean_ms"] is None


def test_reading_room_sample_files_stay_inside_the_samples_folder(tmp_path, samples_dir):
    from ecgvlm.serving import room

    root = str(samples_dir)
    assert room.sample_file(root, "cpsc2018/A0002.hea") == (samples_dir / "cpsc2018/A0002.hea").resolve()
    (tmp_path / "secret.hea").write_text("x")
    for name, status in (("../secret.hea", 400), ("cpsc2018/../../../etc/passwd", 400),
                         (str(tmp_path / "secret.hea"), 400), ("cpsc2018/A0002.csv", 400),
                         ("cpsc2018/A0001.hea", 404)):
        with pytest.raises(sv.ApiError) as err:
            room.sample_file(root, name)
        assert err.value.status == status and err.value.param == "name", name
    with pytest.raises(sv.ApiError, match="no sample records"):
        room.sample_file(None, "cpsc2018/A0002.hea")
    names = {s["name"]: s["files"] for s in room.list_samples(root)}
    assert names["mitdb/106"] == ["106.atr", "106.dat", "106.hea"]
    assert room.list_samples(str(tmp_path / "none")) == []
    page = room.page_html(auth=True)
    assert '"auth": true' in page and "/*ECGVLM_CONFIG*/" not in page


def test_report_view_reads_an_older_runs_predictions(tmp_path):
    # Before the image controls and the claim check, predictions.parquet had neither
    # ``condition`` nor ``claims``: the browser shows such rows as printouts without claims.
    import pandas as pd

    from ecgvlm.serving import room

    (tmp_path / "report.md").write_text("# old report\n")
    pd.DataFrame([{"sample_id": "d/r1#0", "dataset": "d", "model": "pulse", "true_label": "AF",
                   "predicted_label": "AF", "explanation": "rate 80."}]).to_parquet(
        tmp_path / "predictions.parquet")
    summary = room.report_summary(str(tmp_path))
    assert summary["filters"]["condition"] == ["normal"] and summary["n_predictions"] == 1
    rows = room.report_predictions(str(tmp_path), condition="normal", correct=True)
    assert rows["total"] == 1 and rows["data"][0]["claims"] == [] and rows["data"][0]["contradicted"] == 0
    (tmp_path / "predictions.parquet").unlink()
    with pytest.raises(sv.ApiError, match="no predictions.parquet"):
        room.report_summary(str(tmp_path))


def test_rays_not_now_errors_are_503s_with_retry_after_and_bugs_are_not():
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    shed = sv.unavailable_error(BackPressureError(num_queued_requests=8, max_queued_requests=8,
                                                  retry_after_s=2.5))
    assert (shed.status, shed.code, shed.headers()) == (503, "overloaded", {"Retry-After": "3"})
    assert "max_queued_requests=8" in shed.message
    limited = sv.unavailable_error(BackPressureError(1, 1, status_code=429))
    assert (limited.status, limited.type, limited.headers()) == (
        429, "rate_limit_error", {"Retry-After": "1"})
    for lost in (ActorDiedError(), ActorUnavailableError("gone", None)):
        error = sv.unavailable_error(lost)
        assert (error.status, error.code) == (503, "replica_unavailable")
        assert error.headers() == {"Retry-After": "5"}
    assert sv.unavailable_error(DeploymentUnavailableError("PulseModel")).status == 503
    assert sv.unavailable_error(ValueError("a bug")) is None
    assert sv.unavailable_error(KeyError("a bug")) is None


def test_report_rows_are_read_once_per_version_of_predictions_parquet(tmp_path):
    import os

    import pandas as pd

    from ecgvlm.serving import room
    from tests.fakes.mcq_split import sample_rows, write_report_dir

    root = write_report_dir(tmp_path / "report", sample_rows(2))
    first = room.report_predictions(str(root), limit=500)
    reads = room._read_predictions.cache_info().misses
    assert room.report_predictions(str(root), model="pulse", limit=500)["total"] < first["total"]
    assert room._read_predictions.cache_info().misses == reads  # filtered from the cache
    # A rerun of the evaluation replaces the file: the next request reads the new one.
    path = root / "predictions.parquet"
    frame = pd.read_parquet(path)
    frame.iloc[:3].to_parquet(path)
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
    assert room.report_predictions(str(root), limit=500)["total"] == 3
    claims = first["data"][0]["claims"]
    assert isinstance(claims, list) and first["data"][0]["contradicted"] == sum(
        c["verdict"] == "contradicted" for c in claims)


def test_request_timing_is_a_server_timing_header_read_back_in_order():
    import time

    timing = sv.RequestTiming()
    time.sleep(0.01)
    timing.lap("parse")
    timing.lap("call", inner={"queue": 1.5, "model": 2.25})
    header = timing.header()
    assert header.startswith("parse;dur=") and ", call;dur=" in header
    out = sv.parse_server_timing(header)
    assert list(out) == ["parse", "call", "queue", "model", "total"]
    assert out["parse"] >= 10 and out["queue"] == 1.5 and out["model"] == 2.25
    assert out["total"] >= out["parse"] + out["call"]
    # Other servers' metrics may carry a description and no duration: those are skipped.
    assert sv.parse_server_timing('cache;desc="hit", db;dur=53, app;dur=47.2') == {
        "db": 53.0, "app": 47.2}

"""Security checks: the bearer token guards every route but the health checks and the reading
room's page (which holds no data), it is compared in constant time, adapters load only from
the directories given at start, upload names never leave the upload's temporary folder, and
no secret appears in any answer or in any log line the run produced."""

from __future__ import annotations

import types
import uuid
from pathlib import Path

import psutil
import pytest
import requests

from tests.fakes.openai_server import Reply
from tests.reliability.conftest import TOKEN, UPSTREAM_KEY, Live, logs_dir, replica_pids

pytestmark = pytest.mark.integration

PUBLIC = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz")}


def _routes() -> list[tuple[str, str]]:
    """Every route the gateway declares in serve/app.py (a new route is checked too)."""
    import re

    import serve.app

    source = Path(serve.app.__file__).read_text()
    routes = []
    for method, path in re.findall(r'@app\.(get|post|put|patch|delete)\("([^"]+)"\)', source):
        path = path.replace("{name}", "x.png").replace("{name:path}", "a/b.hea")
        routes.append((method.upper(), path.replace("{sample_id:path}", "s1")))
    return routes


def test_every_route_but_health_and_the_page_needs_the_token(live: Live) -> None:
    routes = _routes()
    assert ("POST", "/v1/ecg/interpret") in routes and len(routes) >= 12, routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer not-the-token"},
                        {"Authorization": TOKEN}):
            r = requests.request(method, f"{live.url}{path}", headers=headers, timeout=60)
            if (method, path) in PUBLIC:
                assert r.status_code == 200, (method, path, r.status_code)
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.json()["error"]["code"] == "invalid_api_key"
            assert TOKEN not in r.text


def test_the_token_is_compared_in_constant_time(monkeypatch) -> None:
    import serve.app as app_module

    compared: list[tuple[bytes, bytes]] = []
    real = app_module.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    gateway = object.__new__(app_module.Gateway.func_or_class)
    gateway._token = TOKEN.encode()
    gateway.args = types.SimpleNamespace(auth_token_env="ECGVLM_API_TOKEN")

    request = types.SimpleNamespace(headers={"authorization": "Bearer guess"})
    with pytest.raises(app_module.sv.ApiError):
        gateway._authorize(request)
    assert compared == [(b"guess", TOKEN.encode())]


def test_adapters_load_only_from_the_directories_given_at_start(live: Live) -> None:
    for model in ("pulse-lora:../cpsc", "pulse-lora:/tmp", "pulse-lora:..", "pulse-lora:cpsc/.."):
        r = live.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (model, r.text)


def test_upload_names_never_leave_the_temporary_folder(live: Live) -> None:
    stem = f"escape-{uuid.uuid4().hex[:8]}"
    hea = (live.samples_dir / "cpsc2018" / "A0002.hea").read_text().replace("A0002", stem)
    mat = (live.samples_dir / "cpsc2018" / "A0002.mat").read_bytes()
    files = [("files", (f"../../{stem}.hea", hea.encode())),
             ("files", (f"../../{stem}.mat", mat))]
    r = live.post("/v1/ecg/interpret", files=files,
                  data={"options": '["Atrial fibrillation", "Normal sinus rhythm"]',
                        "max_tokens": "2"})
    # Taken by its base name into a private temporary folder, or refused: never written
    # next to where the replica runs or above it.
    assert r.status_code in (200, 400), r.text
    gateway = psutil.Process(replica_pids("Gateway")[0])
    places = {Path(gateway.cwd()), Path("/tmp"), Path.cwd()}
    places |= {p.parent for p in places} | {p.parent.parent for p in places}
    leaked = [p / f"{stem}{ext}" for p in places for ext in (".hea", ".mat")
              if (p / f"{stem}{ext}").exists()]
    assert not leaked, leaked


def test_no_secret_in_any_log_line(live: Live) -> None:
    # Traffic that puts the secrets in play: wrong tokens, and an upstream that refuses the
    # key while quoting it (as some proxies do), which the endpoint must not pass on.
    requests.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {TOKEN}x"},
                 timeout=30)
    live.fake.script(*[Reply(status=401, body=(
        b'{"error": {"message": "Incorrect API key provided: ' + UPSTREAM_KEY.encode()
        + b'", "type": "invalid_request_error", "code": "invalid_api_key"}}'))] * 4)
    r = live.post("/v1/chat/completions", json={
        "model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code >= 400 and UPSTREAM_KEY not in r.text, r.text
    logs = [p for p in logs_dir().rglob("*") if p.is_file()]
    assert logs, logs_dir()
    for path in logs:
        data = path.read_bytes()
        for secret in (TOKEN, UPSTREAM_KEY):
            assert secret.encode() not in data, f"{secret} in {path}"

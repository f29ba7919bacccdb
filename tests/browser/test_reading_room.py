"""The reading room in a real browser: Debian's Chromium, headless, against ``ecgvlm serve``
with the tiny model and a fake gpt-4o upstream on loopback.

``make test-browser`` installs Chromium when it is missing and runs this; without Chromium
the test is skipped and says so. With ``ECGVLM_SCREENSHOT_DIR`` set (``make test-browser``
sets ``docs/images``) the page's screenshot is kept there as ``reading_room.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.fakes.mcq_split import sample_rows, write_report_dir
from tests.fakes.openai_server import FakeOpenAIServer, Reply

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ECGVLM = Path(sys.executable).with_name("ecgvlm")
SAMPLE = "cpsc2018/A0002"
# What the fake gpt-4o says about every ECG: A0002's RR intervals are regular (contradicted),
# P waves are not measured without wave delineation (unverifiable).
EXPLANATION = "Irregular RR intervals, no P waves."

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None,
                       reason="no chromium here: `make test-browser` installs Debian's and runs this"),
]


def _upstream(request: dict) -> Reply | str:
    if request.get("max_tokens") == 1 and request.get("top_logprobs"):
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())}
               for t, lp in (("B", -0.05), ("A", -3.5), ("C", -4.0), ("D", -4.5))]
        return Reply(content="B", logprobs={"content": [{**top[0], "top_logprobs": top}]})
    return f"The answer is B. {EXPLANATION}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium(url: str, *args: str, timeout_s: float = 300) -> str:
    """Chromium headless on ``url``; ``--virtual-time-budget`` lets the page's requests finish
    (virtual time waits while a fetch is pending) before the DOM is dumped or the shot taken."""
    out = subprocess.run(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--virtual-time-budget=240000", *args, url],
        capture_output=True, text=True, timeout=timeout_s, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def endpoint(tiny_pulse_dir, tmp_path_factory):
    """``ecgvlm serve`` as a user starts it after ``make demo``, gpt-4o on a fake upstream."""
    fake = FakeOpenAIServer(_upstream).start()
    port = _free_port()
    env = {**os.environ, "OPENAI_API_KEY": "sk-fake", "OPENAI_BASE_URL": fake.base_url,
           "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}
    env.pop("ECGVLM_API_TOKEN", None)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    report = write_report_dir(tmp_path_factory.mktemp("report"), sample_rows(3))
    with log.open("w") as out:
        server = subprocess.Popen([str(ECGVLM), "serve", "--model-dir", str(tiny_pulse_dir),
                                   "--port", str(port), "--report-dir", str(report)],
                                  env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, f"no /healthz in 400 s:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        yield url, fake
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        fake.stop()


def _column(dom: str, model: str) -> str:
    """The HTML of one model's column (up to the next column or the end of the section)."""
    columns = dom.split('<div class="model-col" ')
    for chunk in columns[1:]:
        if chunk.startswith(f'data-model="{model}"'):
            return chunk.split("</section>", 1)[0]
    raise AssertionError(f"no column for {model} in the page")


def test_a_bundled_sample_read_by_every_model_with_its_claims_marked(endpoint, tmp_path):
    endpoint, _ = endpoint
    page = f"{endpoint}/?sample={SAMPLE}"
    dom = _chromium(page, "--dump-dom")
    assert 'data-ready="1"' in dom and 'id="page-error" class="error"></div>' in dom
    # The printout and the signal's measurements.
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', dom)
    rate = re.search(r'data-key="heart_rate_bpm"><td>[^<]*</td><td>([0-9.]+)</td>', dom)
    assert rate and 40 < float(rate.group(1)) < 200
    # One column per served model, each answered: PULSE (tiny, random) and gpt-4o.
    for model in ("pulse", "gpt-4o"):
        column = _column(dom, model)
        assert 'data-done="answer"' in column, column[:2000]
        assert re.search(r'class="answer">[A-D]\. ', column) and 'class="fill"' in column
    gpt4o = _column(dom, "gpt-4o")
    assert 'class="answer">B. Atrial fibrillation' in gpt4o
    assert re.search(r'<span class="claim contradicted"[^>]*>Irregular RR intervals</span>', gpt4o)
    assert re.search(r"no <span class=\"claim unverifiable\"[^>]*>P waves</span>", gpt4o)
    # Errors are words on the page: an unknown sample is named.
    missing = _chromium(f"{endpoint}/?sample=nope/X1", "--dump-dom")
    assert "no bundled sample nope/X1" in missing

    shot = tmp_path / "reading_room.png"
    _chromium(page, f"--screenshot={shot}", "--window-size=1400,1300", "--hide-scrollbars")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    keep = os.environ.get("ECGVLM_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "reading_room.png")


def test_an_api_error_is_shown_in_words_in_its_column(endpoint):
    url, fake = endpoint
    # The upstream refuses gpt-4o's two requests (the answer and the letters' scores): its
    # column says why, PULSE's column still answers.
    fake.script(Reply(status=401), Reply(status=401))
    dom = _chromium(f"{url}/?sample={SAMPLE}", "--dump-dom")
    gpt4o = _column(dom, "gpt-4o")
    assert 'data-done="error"' in gpt4o
    message = re.search(r'<div class="error">([^<]+)</div>', gpt4o)
    assert message and message.group(1).startswith("5") and "gpt-4o" in message.group(1), gpt4o[:1500]
    assert 'data-done="answer"' in _column(dom, "pulse")


def test_the_report_view_lists_the_evaluations_predictions(endpoint):
    endpoint, _ = endpoint
    dom = _chromium(f"{endpoint}/#report", "--dump-dom")
    assert 'id="report-error" class="error"></div>' in dom
    assert "# Evaluation report" in dom and re.search(r'<img src="blob:[^"]+" alt="metrics_bars.png"', dom)
    rows = re.findall(r'<tr data-sample="([^"]+)">', dom)
    assert len(rows) == 12 and "12 of 12 predictions" in dom  # 6 samples x 2 models

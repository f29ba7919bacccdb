"""Walk the README and the docs it links as a new user would: every command block, in order.

The repository's tracked files are copied to a fresh temporary folder (``git ls-files``, so
nothing git-ignored such as ``runs/`` or ``.venv`` comes along) and every fenced ``bash``
block of README.md, then of each linked doc in the README's order, runs there top to bottom
with the test's virtualenv first on PATH (``source .venv/bin/activate``) and the copy on
PYTHONPATH. README's ``python`` blocks run too (the docs' ``python`` blocks are library
snippets with placeholders, not commands). Later blocks read what earlier ones wrote.

What differs from typing the blocks by hand, all said in the README:

- The local-cluster recipe (marked ``<!-- readme-test: cluster ... -->``) is not run: the
  suite's own ``ray start --head`` cluster (``ray_head`` in conftest.py, the same recipe on
  free ports) stands in for it; its address and token are in the environment of every block,
  as the recipe's exports would be, and ``127.0.0.1:6379`` is its GCS address. Any other Ray
  a block starts (``serve run``'s) lives under a temp dir of the walk's own (``RAY_TMPDIR``)
  and is stopped with it.
- Training commands get ``max_steps=2`` (appended after ``--config FILE``), and a search
  (``ecgvlm tune``) one trial instead of three (``num_samples=1``): each trial is a whole
  training run, about 45 s here. ``tests/integration/test_tune.py`` runs a search of three
  (ASHA stopping some, a killed search resumed). Evaluations get ``limit_per_dataset=3``
  (the demo config asks up to 20 questions of each data set: about 58 s a run here, where
  docs/evaluate.md's run of 3 took 39 s).
- The endpoint listens on a free port instead of 8000 (``:8000``/``--port 8000`` in commands,
  ``port: 8000`` and ``127.0.0.1:8000`` in the copy's serve/config.yaml and configs/).
- A command that blocks (``ecgvlm serve``, ``serve run``) runs in the background until the
  endpoint answers ``/healthz``; it is stopped with Ctrl-C (SIGINT) when the next one starts
  and at the end.
- A command already run earlier in the walk (the same text after substitutions) is not run
  again: the docs repeat README steps whose results are already there.
- Blocks marked ``<!-- readme-test: skip REASON -->`` need what no test machine has (GPUs,
  full databases, a cloud account, or are ``make test`` itself); the reason is required.

Every failure prints the file, the block and its output.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ecgvlm.local_ray import stop_processes_under
from tests.conftest import SUMMARY_PROPERTY

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: README.md first, then the docs in the order the README links them.
DOCS = ["README.md", "docs/data.md", "docs/measure.md", "docs/render.md", "docs/prepare.md", "docs/model.md",
        "docs/train.md", "docs/serve.md", "docs/evaluate.md", "docs/reliability.md"]
BLOCK = re.compile(
    r"(?:<!-- readme-test: (?P<mark>[^\n]*?) -->[ \t]*\n)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>[a-z]*)\n(?P<body>.*?)^(?P=indent)```",
    re.DOTALL | re.MULTILINE,
)
#: Overrides the walk appends after ``--config FILE`` of training, search and evaluation
#: commands (README says so): the command (``ecgvlm JOB`` or ``python -m jobs.JOB``), its
#: overrides. A command's own later ``key=value`` still wins.
COMMAND_OVERRIDES = [
    (re.compile(rf"((?:ecgvlm {job}|python -m jobs\.{job}) --config \S+)"), overrides)
    for job, overrides in (("train", "max_steps=2"), ("tune", "num_samples=1"),
                           ("evaluate", "limit_per_dataset=3"))
]
SERVER_COMMAND = re.compile(r"^(?:\S+=\S* )*(?:ecgvlm serve|serve run)\b")
#: Seconds the whole walk may take; a command still running then fails with its block printed.
WALK_BUDGET_S = 2400


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    mark: str | None
    body: str

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def doc_blocks(doc: str) -> list[Block]:
    """The ``bash`` (and, in README.md, ``python``) blocks of ``doc`` with their markers."""
    text = (ROOT / doc).read_text()
    langs = ("bash", "python") if doc == "README.md" else ("bash",)
    return [
        Block(doc, text.count("\n", 0, m.start("body")), m["lang"], m["mark"], m["body"])
        for m in BLOCK.finditer(text) if m["lang"] in langs
    ]


def logical_lines(body: str) -> list[str]:
    """Commands of a block: continuation lines joined, comments and blank lines dropped."""
    lines, current = [], ""
    for raw in body.splitlines():
        current += raw
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def command_key(line: str) -> str:
    """A command without its trailing comment, to recognise one the walk already ran."""
    return re.sub(r"\s+#.*$", "", line)


def splittable(body: str) -> bool:
    """Whether each logical line is a complete shell command (no quote spans lines)."""
    try:
        for line in logical_lines(body):
            shlex.split(line, comments=True)
    except ValueError:
        return False
    return True


def _free_port() -> int:
    """A port free now and below the kernel's ephemeral range (and above Ray's worker ports,
    10002-19999). The endpoint binds it minutes after the walk chose it: a port from
    ``bind(0)`` is one the kernel also hands to outgoing connections, and the walk's
    ``ecgvlm serve`` once found its port taken that way."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first_ephemeral = int(ephemeral.read_text().split()[0]) if ephemeral.exists() else 32768
    for port in random.sample(range(20000, max(first_ephemeral, 20100)), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


class Walk:
    """The state of one walk: the copy, its environment, the server running, what ran."""

    def __init__(self, copy: Path, env: dict[str, str], gcs_address: str, port: int):
        self.copy, self.env, self.gcs, self.port = copy, env, gcs_address, port
        self.server: subprocess.Popen | None = None
        self.server_log: Path | None = None
        self.done: set[str] = set()
        self.ran: list[str] = []
        self.deadline = time.time() + WALK_BUDGET_S

    def substitute(self, text: str) -> str:
        text = text.replace("127.0.0.1:6379", self.gcs)
        text = re.sub(r":8000\b", f":{self.port}", text)
        text = re.sub(r"--port 8000\b", f"--port {self.port}", text)
        for command, overrides in COMMAND_OVERRIDES:
            text = command.sub(rf"\1 {overrides}", text)
        return text

    def fail(self, block: Block, what: str, output: str) -> None:
        server = ""
        if self.server is not None and self.server_log is not None:
            state = ("running" if self.server.poll() is None
                     else f"exited with {self.server.returncode}")
            server = (f"\n--- the server started before ({state}), its log's end ---\n"
                      f"{self.server_log.read_text(errors='replace')[-3000:]}")
        pytest.fail(f"{block.where()}: {what}\n--- block ---\n{block.body}--- output ---\n"
                    f"{output[-6000:]}{server}\n--- the walk so far ---\n" + "\n".join(self.ran),
                    pytrace=False)

    def run(self, block: Block, argv: list[str], what: str) -> None:
        """Run ``argv`` in the copy; a failure or the walk's deadline fails with the block."""
        left_s = max(1.0, self.deadline - time.time())
        try:
            done = subprocess.run(argv, cwd=self.copy, env=self.env, capture_output=True,
                                  text=True, timeout=left_s, check=False)
        except subprocess.TimeoutExpired as e:
            output = "".join(o if isinstance(o, str) else (o or b"").decode(errors="replace")
                             for o in (e.stdout, e.stderr))
            self.fail(block, f"still running when the walk's {WALK_BUDGET_S} s ran out:\n{what}",
                      output)
        if done.returncode != 0:
            self.fail(block, f"exit status {done.returncode} from:\n{what}",
                      done.stdout + done.stderr)

    def run_shell(self, block: Block, script: str) -> None:
        self.run(block, ["bash", "-euo", "pipefail", "-c", script], script)

    def run_python(self, block: Block) -> None:
        self.run(block, [sys.executable, "-c", self.substitute(block.body)], "the python block")

    def start_server(self, block: Block, command: str) -> None:
        self.stop_server()
        self.server_log = self.copy / "runs" / f"server-{len(self.ran)}.log"
        self.server_log.parent.mkdir(parents=True, exist_ok=True)
        with self.server_log.open("w") as log:
            self.server = subprocess.Popen(["bash", "-c", command], cwd=self.copy,
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        deadline = min(time.time() + 400, self.deadline)
        while time.time() < deadline:
            if self.server.poll() is not None:
                self.fail(block, f"{command!r} exited with {self.server.returncode}",
                          self.server_log.read_text())
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        self.fail(block, f"{command!r} did not answer /healthz", self.server_log.read_text())

    def stop_server(self) -> None:
        if self.server is None or self.server.poll() is not None:
            return
        os.killpg(self.server.pid, signal.SIGINT)  # Ctrl-C in its terminal, as the docs say
        try:
            self.server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()

    def run_block(self, block: Block) -> None:
        """Run the block and note it in ``ran`` with its seconds (where the walk's time goes)."""
        t0 = time.monotonic()
        note = self._run_block(block)
        self.ran.append(f"{time.monotonic() - t0:6.1f} s  {block.where()}{note}")

    def _run_block(self, block: Block) -> str:
        if block.lang == "python":
            self.run_python(block)
            return ""
        body = self.substitute(block.body)
        if not splittable(body):  # e.g. a curl body spanning lines: one script
            self.run_shell(block, body)
            return ""
        todo = [ln for ln in logical_lines(body) if command_key(ln) not in self.done]
        for line in todo:
            if SERVER_COMMAND.match(line):
                self.start_server(block, line)
            else:
                self.run_shell(block, line)
            self.done.add(command_key(line))
        return "" if todo else " (every command ran before)"


def _copy_tracked_files(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def test_every_block_is_run_or_says_why_not():
    skipped = []
    for doc in DOCS:
        for block in doc_blocks(doc):
            if block.mark is None:
                continue
            kind, _, reason = block.mark.partition(" ")
            assert kind in ("skip", "cluster"), f"{block.where()}: unknown marker {block.mark!r}"
            if kind == "skip":
                assert reason.strip(), f"{block.where()}: a skipped block must say why"
                skipped.append(block.where())
    runnable = [b for d in DOCS for b in doc_blocks(d) if b.mark is None]
    assert len(runnable) >= 20 and len(skipped) <= 8, (len(runnable), skipped)


@pytest.mark.integration
@pytest.mark.timeout(WALK_BUDGET_S + 600)
def test_readme_and_docs_walk_top_to_bottom(ray_head_info, tmp_path, record_property):
    head, client_env = ray_head_info
    copy = tmp_path / "ecgvlm"
    _copy_tracked_files(copy)
    port = _free_port()
    for config in [copy / "serve" / "config.yaml", *(copy / "configs").glob("*.yaml")]:
        text = re.sub(r"\bport: 8000\b", f"port: {port}", config.read_text())
        config.write_text(text.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    env = dict(client_env)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(copy)
    env["RAY_ADDRESS"] = head.address  # the recipe's export
    # A short path: Ray puts unix sockets under it (107-byte limit).
    env["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")
    walk = Walk(copy, env, head.address, port)
    try:
        for doc in DOCS:
            for block in doc_blocks(doc):
                if block.mark is None:
                    walk.run_block(block)
    finally:
        walk.stop_server()
        stop_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # In the run's summary (tests/conftest.py), so that every run's log says where the walk's
    # time went (the slowest test of the suite), not only a failed one's.
    record_property(SUMMARY_PROPERTY, "README walk, seconds per block:\n" + "\n".join(walk.ran))

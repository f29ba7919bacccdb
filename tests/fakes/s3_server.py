"""A real S3-compatible server on loopback for the object-storage tests: moto's server mode
(``python -m moto.server``) in a process of its own, on a free port.

The code under test talks to it the way it talks to AWS: through ``pyarrow.fs`` (and Ray
Train's and Ray Data's use of it), configured only by the standard variables in
``S3Server.env`` (``AWS_ENDPOINT_URL`` and test credentials). Nothing of ours is mocked.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from ecgvlm.local_ray import free_ports


class S3Server:
    """``with S3Server() as s3:`` starts the server; ``s3.env`` reaches it; ``make_bucket``."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Never ask an instance-metadata service for credentials (a slow time-out here).
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self._proc: subprocess.Popen | None = None
        # The server logs every request: to a file, never to a pipe nobody reads (a full
        # pipe would block the server mid-request).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open while the server runs

    def start(self, timeout_s: float = 60.0) -> S3Server:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)
                    err = self._log.read().decode(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"moto server did not start on {self.endpoint}: {err}")
                time.sleep(0.2)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; return ``s3://name``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=self.endpoint, scheme="http", region="us-east-1",
            access_key="testing", secret_key="testing", allow_bucket_creation=True,
        )
        fs.create_dir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None
        self._log.close()

    def __enter__(self) -> S3Server:  # noqa: PYI034 - as FakeOpenAIServer
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

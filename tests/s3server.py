"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1, spoken to over HTTP
by botocore and s3fs exactly as a real bucket would be (no client is patched).

The session fixture `s3` in conftest.py starts one `S3Server` and puts its endpoint and dummy
credentials in os.environ (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), where botocore looks for them
and where subprocesses started by the tests inherit them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ACCESS_KEY, SECRET_KEY, REGION = "testing-key", "testing-secret", "us-east-1"


class S3Server:
    """`python -m moto.server` as a subprocess; `env` is what a client needs to reach it."""

    def __init__(self, port: int, log: Path):
        self.port, self.log = port, log
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> S3Server:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                             str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto.server exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto.server did not answer on {self.endpoint} within {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @contextmanager
    def authentication(self) -> Iterator[None]:
        """Inside: the server checks every request's credentials against its IAM users, of which there
        are none, so each is refused as AWS refuses a wrong key (403 InvalidAccessKeyId)."""
        def set_count(value: bytes) -> None:
            request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=value, method="POST",
                                             headers={"Content-Type": "text/plain"})  # not a form: the raw body
            urllib.request.urlopen(request, timeout=10).close()

        set_count(b"0")
        try:
            yield
        finally:
            set_count(b"inf")

    def client(self):
        """A botocore S3 client of this server (credentials and endpoint given explicitly)."""
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", region_name=REGION, endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY)

    def new_bucket(self) -> str:
        """A fresh, empty bucket: its s3:// URL."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, folder: str | os.PathLike, url: str) -> str:
        """Every file below a local folder to the prefix `url` (s3://bucket/prefix), keys mirroring the
        relative paths; returns `url`."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        client, folder = self.client(), Path(folder)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = "/".join(filter(None, (prefix.strip("/"), path.relative_to(folder).as_posix())))
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return url

    def keys(self, url: str) -> list[str]:
        """The keys below a prefix, sorted."""
        bucket, _, prefix = url[len("s3://"):].partition("/")
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


class CountingProxy:
    """An HTTP proxy in front of an S3Server that counts the object bytes it hands out and can cut
    object reads short: what a flaky network does to a client, over real sockets.

    Point AWS_ENDPOINT_URL at `endpoint`. `sent` holds the body bytes of every GET answered (object
    reads); `cut = n` cuts the next n ranged GETs after half their body (the connection closes, the
    client sees a short read); `cut_after = k` first answers k ranged GETs whole; `cut = -1` cuts
    every ranged GET (after those k). `delay` seconds are added to every answer; `peak` is the most
    requests that were being answered at once, `requests` the (method, path) of each."""

    def __init__(self, target: str, port: int):
        import http.client
        import http.server
        import threading

        self.endpoint, self.sent, self.cut, self.cut_after = f"http://127.0.0.1:{port}", [], 0, 0
        self.delay, self.active, self.peak, self.requests = 0.0, 0, 0, []
        lock = threading.Lock()
        host, target_port = target.removeprefix("http://").split(":")
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: pytest captures stderr
                pass

            def _forward(self):
                with lock:
                    proxy.active += 1
                    proxy.peak = max(proxy.peak, proxy.active)
                    proxy.requests.append((self.command, self.path))
                try:
                    time.sleep(proxy.delay)
                    self._answer()
                finally:
                    with lock:
                        proxy.active -= 1

            def _answer(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection(host, int(target_port), timeout=30)
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                reply = upstream.getresponse()
                data = reply.read()
                upstream.close()
                cut = False
                if self.command == "GET" and "Range" in self.headers:
                    if proxy.cut_after > 0:
                        proxy.cut_after -= 1
                    elif proxy.cut != 0:
                        cut, proxy.cut = True, proxy.cut - (proxy.cut > 0)
                self.send_response(reply.status)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # HEAD: the object's length, as the server gave it (no body follows)
                self.send_header("Content-Length", reply.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                shown = data[: len(data) // 2] if cut else data
                self.wfile.write(shown)
                if self.command == "GET":
                    proxy.sent.append(len(shown))
                if cut:
                    self.close_connection = True

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

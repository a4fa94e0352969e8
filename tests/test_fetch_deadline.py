"""--timeout is a deadline per attempt: fetch() against servers on 127.0.0.1 that drip the headers,
the body or (through a relay) a whole TLS exchange one byte every 0.2 s, so that each read arrives
well within requests' idle timeout; before, such a URL took 30-40 s with --timeout 2. Every test
asserts the reason id and bounds the wall time."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmpretrain.errors import SampleError
from mmpretrain.parallel import ordered_map
from mmpretrain.prepare.fetch import FetchOptions, fetch, thread_session

DRIP_S = 0.2
IMAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"
ONE_TRY = FetchOptions(timeout=1.0, retries=0, backoff=0.0)
# Well over 1 s of deadline and well under the > 10 s the servers take to drip a response.
BOUND_S = 2.5


class Drip(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a second fetch can reuse the connection

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except OSError:
            pass  # the client cut the connection at its deadline (a broken pipe, a TLS EOF)

    def do_GET(self):
        state = self.server.state
        with state.lock:
            state.requests.append((self.path, self.client_address[1]))
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
        if self.path == "/img":
            self.wfile.write(head + b"Content-Length: %d\r\n\r\n" % len(IMAGE) + IMAGE)
        elif self.path == "/drip-body/length":  # 100 bytes of 1 000: 20 s
            self.wfile.write(head + b"Content-Length: 1000\r\n\r\n")
            self.drip(bytes(1000))
        elif self.path == "/drip-body/close":  # ends at EOF: a cut-off body looks complete
            self.close_connection = True
            self.wfile.write(head + b"Connection: close\r\n\r\n")
            self.drip(IMAGE)
        elif self.path == "/drip-headers":  # 80 header bytes: 16 s
            self.drip(head + b"X-Pad: " + b"p" * 24 + b"\r\nContent-Length: %d\r\n\r\n" % len(IMAGE) + IMAGE)

    def drip(self, data: bytes):
        for i in range(len(data)):
            if self.server.state.stop.wait(DRIP_S):
                return
            self.wfile.write(data[i : i + 1])


class Server:
    """A ThreadingHTTPServer on an ephemeral port (optionally TLS) that records (path, client port)."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.requests = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
        if tls is not None:
            # The handshake then runs in the handler's thread, not in the accept loop.
            self.httpd.socket = tls.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.httpd.daemon_threads = True
        self.httpd.state = self
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls else "http"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self):
        self.stop.set()  # every drip loop returns within DRIP_S
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()
    thread_session().close()  # drop kept-alive connections to this server


def timed_failure(url: str, options: FetchOptions = ONE_TRY) -> tuple[SampleError, float]:
    start = time.monotonic()
    with pytest.raises(SampleError) as info:
        fetch(url, options)
    return info.value, time.monotonic() - start


@pytest.mark.parametrize("framing", ["length", "close"])
def test_dripped_body_is_a_timeout_at_the_deadline(server, framing):
    error, elapsed = timed_failure(server.url(f"/drip-body/{framing}"))
    assert error.reason == "http_timeout"
    assert "within 1 s" in error.detail
    assert 0.9 < elapsed < BOUND_S  # the deadline, not the first idle read nor the whole drip


def test_dripped_headers_are_a_timeout_at_the_deadline(server):
    error, elapsed = timed_failure(server.url("/drip-headers"))
    assert error.reason == "http_timeout"
    assert 0.9 < elapsed < BOUND_S


def test_each_retry_gets_one_whole_deadline(server):
    error, elapsed = timed_failure(
        server.url("/drip-body/length"), FetchOptions(timeout=1.0, retries=1, backoff=0.0)
    )
    assert error.reason == "http_timeout"
    assert error.detail.endswith("(2 attempts)")
    assert [path for path, _ in server.requests] == ["/drip-body/length"] * 2
    assert 1.9 < elapsed < 2 * BOUND_S - 1.0


def test_reused_keep_alive_connection_is_cut_off_and_never_pooled_again(server):
    assert fetch(server.url("/img"), ONE_TRY) == IMAGE
    error, elapsed = timed_failure(server.url("/drip-body/length"))
    assert error.reason == "http_timeout"
    assert elapsed < BOUND_S
    assert fetch(server.url("/img"), ONE_TRY) == IMAGE  # a fresh connection, not the cut one
    ports = [port for _, port in server.requests]
    assert ports[0] == ports[1]  # the slow request really went over the kept-alive connection
    assert ports[2] != ports[1]


def test_fast_urls_keep_flowing_while_one_drips(server):
    urls = [server.url("/drip-body/length")] + [server.url("/img")] * 40
    done_at = {}
    start = time.monotonic()

    def work(k_url):
        k, url = k_url
        try:
            body = fetch(url, ONE_TRY)
        except SampleError as error:
            body = error.reason
        done_at[k] = time.monotonic() - start
        return body

    results = list(ordered_map(work, enumerate(urls), threads=4, window=64))
    assert results == ["http_timeout"] + [IMAGE] * 40
    assert max(done_at[k] for k in range(1, 41)) < 0.9  # all done before the slow one's deadline
    assert 0.9 < done_at[0] < BOUND_S


# ---- TLS: the handshake is also cut off (urllib3 wraps, and so detaches, the socket it connected) ------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = (tmp_path_factory.mktemp("tls") / name for name in ("cert.pem", "key.pem"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, str(cert)


@pytest.fixture
def tls_server(tls, monkeypatch):
    context, cert = tls
    srv = Server(context)
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # requests lets these override session.verify
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(thread_session(), "verify", cert)
    yield srv
    srv.close()
    thread_session().close()


class DripRelay:
    """Forwards client bytes to `port` at once and the answer back one byte per DRIP_S, so even the
    TLS handshake drips."""

    def __init__(self, port: int, stop: threading.Event):
        self.port, self.stop = port, stop
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                client = self.listener.accept()[0]
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pipe, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, DRIP_S), daemon=True).start()
        self.listener.close()

    def _pipe(self, source: socket.socket, sink: socket.socket, pause: float):
        with source, sink:
            try:
                while (data := source.recv(1 if pause else 65536)) and not self.stop.wait(pause):
                    sink.sendall(data)
            except OSError:
                pass  # the other side hung up


def test_https_dripped_body_is_a_timeout_at_the_deadline(tls_server):
    assert fetch(tls_server.url("/img"), ONE_TRY) == IMAGE
    error, elapsed = timed_failure(tls_server.url("/drip-body/length"))
    assert error.reason == "http_timeout"
    assert 0.9 < elapsed < BOUND_S


def test_https_dripped_handshake_is_a_timeout_at_the_deadline(tls_server):
    relay = DripRelay(tls_server.port, tls_server.stop)
    error, elapsed = timed_failure(f"https://127.0.0.1:{relay.listener.getsockname()[1]}/img")
    assert error.reason == "http_timeout"
    assert 0.9 < elapsed < BOUND_S
    assert tls_server.requests == []  # cut off before a request was ever sent

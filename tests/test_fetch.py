"""fetch() and ordered_map() against a real HTTP server that each test starts on 127.0.0.1; every
test asserts the outcome (bytes, reason id, request count server-side, sleeps, timing)."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmpretrain.errors import SampleError
from mmpretrain.prepare import fetch as fetch_module
from mmpretrain.prepare.fetch import FetchOptions, fetch, thread_session

IMAGE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9"  # JPEG-framed, 10 246 bytes
FAST = FetchOptions(timeout=2.0, retries=2, backoff=0.0)
ENDLESS_CAP = 64 * 1024 * 1024  # the endless route gives up after this many bytes


def payload(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        state = self.server.state
        with state.lock:
            state.hits[self.path] += 1
            hit = state.hits[self.path]
            state.agents.append(self.headers.get("User-Agent"))
        route, _, arg = self.path[1:].partition("/")
        getattr(self, "route_" + route.replace("-", "_"))(arg, hit)

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client hung up on purpose (too_large, timeout, an unread error body)

    def reply(self, status, body=b"", content_type="image/jpeg", headers=()):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_img(self, arg, hit):
        self.reply(200, IMAGE, content_type=arg.replace("_", "/") if arg else None)

    def route_status(self, arg, hit):
        self.reply(int(arg), b"<html>nope</html>", "text/html")

    def route_flaky(self, arg, hit):
        if hit == 1:
            self.reply(503, b"busy", "text/plain")
        else:
            self.reply(200, IMAGE)

    def route_retry_after(self, arg, hit):
        self.reply(429, b"slow down", "text/plain", [("Retry-After", arg)])

    def route_sleep(self, arg, hit):
        self.server.state.stop.wait(1.5)
        self.reply(200, IMAGE)

    def route_stall_body(self, arg, hit):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE[:100])
        self.wfile.flush()
        self.server.state.stop.wait(1.5)
        self.wfile.write(IMAGE[100:])

    def route_chain(self, arg, hit):
        n = int(arg)
        if n == 0:
            self.reply(200, IMAGE)
        else:
            self.reply(302, b"", None, [("Location", f"/chain/{n - 1}")])

    def route_loop(self, arg, hit):
        self.reply(302, b"", None, [("Location", "/loop/")])

    def route_to_ftp(self, arg, hit):
        self.reply(301, b"", None, [("Location", "ftp://example.invalid/x.jpg")])

    def route_sized(self, arg, hit):
        self.reply(200, payload(int(arg)))

    def route_chunked(self, arg, hit):
        body = payload(int(arg))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 4096):
            piece = body[start : start + 4096]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def route_endless(self, arg, hit):
        """No Content-Length, body until the client hangs up (chunked, or ended by closing)."""
        state, chunked = self.server.state, arg == "chunked"
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        self.end_headers()
        self.close_connection = True
        piece = payload(65536)
        try:
            while state.sent < ENDLESS_CAP and not state.stop.is_set():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                state.sent += len(piece)
        finally:
            state.endless_done.set()

    def route_cookie(self, arg, hit):
        self.reply(200, IMAGE, headers=[("Set-Cookie", "visitor=1; Path=/")])

    def route_empty(self, arg, hit):
        self.reply(200, b"")


class Server:
    """A ThreadingHTTPServer on an ephemeral port with request counts per path."""

    def __init__(self):
        self.hits = Counter()
        self.agents = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.endless_done = threading.Event()
        self.sent = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.state = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """requests honours *_PROXY variables; these tests must only ever talk to 127.0.0.1."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()
    thread_session().close()  # drop kept-alive connections to this server


@pytest.fixture
def sleeps(monkeypatch):
    recorded = []
    monkeypatch.setattr(fetch_module, "_sleep", recorded.append)
    return recorded


def failure(url: str, options: FetchOptions = FAST) -> SampleError:
    with pytest.raises(SampleError) as info:
        fetch(url, options)
    return info.value


# ---- success -------------------------------------------------------------------------------------


def test_200_returns_exact_bytes_and_sends_user_agent(server):
    assert fetch(server.url("/img"), FAST) == IMAGE
    assert server.agents == [FetchOptions().user_agent]


@pytest.mark.parametrize(
    "content_type", ["image_jpeg", "application_octet-stream", "binary_octet-stream", ""]
)
def test_mislabelled_or_unlabelled_images_are_accepted(server, content_type):
    assert fetch(server.url(f"/img/{content_type}"), FAST) == IMAGE


# ---- HTTP status and retries ------------------------------------------------------------------------


def test_404_fails_at_once_with_one_line_detail(server, sleeps):
    url = server.url("/status/404")
    error = failure(url)
    assert error.reason == "http_404"
    assert error.detail == f"GET {url} -> 404 Not Found"
    assert server.hits["/status/404"] == 1
    assert sleeps == []


def test_500_is_retried_then_fails_with_exponential_backoff(server, sleeps):
    error = failure(server.url("/status/500"), FetchOptions(retries=2, backoff=0.01))
    assert error.reason == "http_500"
    assert error.detail.endswith("500 Internal Server Error (3 attempts)")
    assert server.hits["/status/500"] == 3
    assert sleeps == [0.01, 0.02]


def test_503_once_then_success(server):
    assert fetch(server.url("/flaky"), FAST) == IMAGE
    assert server.hits["/flaky"] == 2


def test_retries_zero_means_one_attempt(server):
    assert failure(server.url("/status/502"), FetchOptions(retries=0, backoff=0.0)).reason == "http_502"
    assert server.hits["/status/502"] == 1


@pytest.mark.parametrize(("header", "expected"), [("2", [2.0]), ("30", [10.0]), ("soon", [0.25])])
def test_429_honours_retry_after_capped(server, sleeps, header, expected):
    error = failure(server.url(f"/retry-after/{header}"), FetchOptions(retries=1, backoff=0.25))
    assert error.reason == "http_429"
    assert server.hits[f"/retry-after/{header}"] == 2
    assert sleeps == expected  # an unparseable Retry-After falls back to the backoff


def test_backoff_zero_never_sleeps_even_with_retry_after(server, sleeps):
    assert failure(server.url("/retry-after/5"), FetchOptions(retries=2, backoff=0.0)).reason == "http_429"
    assert server.hits["/retry-after/5"] == 3
    assert sleeps == []


# ---- timeouts and connections ------------------------------------------------------------------------


def test_slow_server_times_out_quickly_and_is_retried(server):
    start = time.monotonic()
    error = failure(server.url("/sleep"), FetchOptions(timeout=0.3, retries=1, backoff=0.0))
    elapsed = time.monotonic() - start
    assert error.reason == "http_timeout"
    assert server.hits["/sleep"] == 2
    assert 0.5 < elapsed < 1.3  # two 0.3 s attempts, never the server's 1.5 s


def test_stall_in_the_middle_of_the_body_is_a_timeout(server):
    start = time.monotonic()
    error = failure(server.url("/stall-body"), FetchOptions(timeout=0.3, retries=0, backoff=0.0))
    assert error.reason == "http_timeout"
    assert time.monotonic() - start < 1.3


def test_refused_connection(sleeps):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    error = failure(f"http://127.0.0.1:{port}/x.jpg", FetchOptions(retries=1, backoff=0.01))
    assert error.reason == "connection_error"
    assert "refused" in error.detail.lower()
    assert sleeps == [0.01]  # retried once


# ---- redirects -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hops", [2, 5])
def test_redirect_chain_within_limit_succeeds(server, hops):
    assert fetch(server.url(f"/chain/{hops}"), FetchOptions(max_redirects=5, backoff=0.0)) == IMAGE
    assert [server.hits[f"/chain/{n}"] for n in range(hops + 1)] == [1] * (hops + 1)


def test_redirect_chain_longer_than_limit(server):
    error = failure(server.url("/chain/6"), FetchOptions(max_redirects=5, backoff=0.0))
    assert error.reason == "too_many_redirects"
    assert sum(server.hits.values()) == 6  # the first request and 5 hops, not retried
    assert server.hits["/chain/0"] == 0


def test_redirect_loop(server):
    error = failure(server.url("/loop/"), FetchOptions(max_redirects=3, backoff=0.0))
    assert error.reason == "too_many_redirects"
    assert server.hits["/loop/"] == 4


def test_redirect_to_ftp_is_invalid_url(server):
    error = failure(server.url("/to-ftp/"))
    assert error.reason == "invalid_url"
    assert "ftp://example.invalid/x.jpg" in error.detail


# ---- size limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["sized", "chunked"])
def test_body_of_exactly_max_bytes_is_kept(server, route):
    assert fetch(server.url(f"/{route}/10000"), FetchOptions(max_bytes=10_000, backoff=0.0)) == payload(
        10_000
    )


@pytest.mark.parametrize("route", ["sized", "chunked"])
def test_one_byte_over_max_bytes_is_too_large(server, route):
    error = failure(server.url(f"/{route}/10001"), FetchOptions(max_bytes=10_000, backoff=0.0))
    assert error.reason == "too_large"
    assert ("Content-Length 10001" in error.detail) == (route == "sized")


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_endless_body_stops_reading_at_the_limit(server, framing):
    error = failure(server.url(f"/endless/{framing}"), FetchOptions(max_bytes=100_000, backoff=0.0))
    assert error.reason == "too_large"
    # The server notices the hang-up long before its 64 MiB cap: the client stopped reading.
    assert server.endless_done.wait(5.0)
    assert server.sent < ENDLESS_CAP


# ---- content ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text_html", "text_plain", "application_json", "application_problem+json"]
)
def test_page_instead_of_image(server, content_type):
    error = failure(server.url(f"/img/{content_type}"))
    assert error.reason == "not_an_image"
    assert content_type.replace("_", "/") in error.detail


def test_error_status_wins_over_html_content_type(server):
    assert failure(server.url("/status/403")).reason == "http_403"


def test_empty_body(server):
    assert failure(server.url("/empty")).reason == "empty_body"


@pytest.mark.parametrize(
    "url", ["ftp://x", "not a url", "http://", "file:///etc/passwd", "http://[::1/x", None, float("nan")]
)
def test_invalid_url(url):
    error = failure(url)
    assert type(error) is SampleError
    assert error.reason == "invalid_url"


def test_thread_session_is_per_thread_and_keeps_no_cookies(server):
    other = []
    worker = threading.Thread(target=lambda: other.append(thread_session()))
    worker.start()
    worker.join()
    assert thread_session() is thread_session()
    assert other[0] is not thread_session()
    assert fetch(server.url("/cookie"), FAST) == IMAGE
    assert len(thread_session().cookies) == 0  # a session living for millions of hosts stays small

"""Download image URLs for `prepare` (the img2dataset step): one URL's bytes with bounded retries,
size and redirect limits, and an in-order thread-pool map over an iterator too long to hold.

Every per-URL failure is a SampleError with a stable reason id (``http_404``, ``http_timeout``,
``too_many_redirects``, ``too_large``, ``not_an_image``, ``connection_error``, ``empty_body``,
``invalid_url``), so a 404-heavy URL list shows up as counts in stats.json instead of looking like a
hang.

``FetchOptions.timeout`` is a deadline for a whole attempt, not requests' idle time between reads
(a server dripping one byte every 0.5 s kept a 2 s ``--timeout`` busy for 40 s): one watchdog
thread shuts down the sockets of attempts past their deadline, which makes the worker's blocked
recv return at once. The connection classes of `thread_session` register their sockets for it. A
DNS lookup cannot be cut off this way; it is bounded by the system resolver."""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.poolmanager
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ReadTimeoutError

from mmpretrain.errors import SampleError

CHUNK_BYTES = 64 * 1024
RETRY_AFTER_CAP_S = 10.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Servers often label images application/octet-stream, binary/octet-stream or nothing at all, so
# only types that are clearly a page or an API answer (the "soft 404" HTML page) are rejected.
_PAGE_TYPES = frozenset({"application/json", "application/javascript", "application/xml"})
_BAD_URL_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
)
# A certificate or a body that does not decompress will not change on a second try.
_PERMANENT_ERRORS = (requests.exceptions.SSLError, requests.exceptions.ContentDecodingError)

_sleep = time.sleep  # module-level so tests can record the backoff instead of waiting
_local = threading.local()


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0
    """Seconds per attempt in all: connect, response headers and body (redirect hops included). Not
    covered: the DNS lookup (bounded by the system resolver), and a host with several addresses
    gets the time left for each connect in turn (urllib3 tries them one after another)."""
    retries: int = 2
    """Extra attempts after the first, only for timeouts, connection errors, HTTP 429 and 5xx."""
    backoff: float = 0.5
    """Sleep ``backoff * 2**attempt`` between attempts (or Retry-After, capped); 0 never sleeps."""
    max_bytes: int = 20_000_000
    """Larger bodies fail with ``too_large``; at most max_bytes + one chunk is ever buffered."""
    max_redirects: int = 5
    """More hops than this fail with ``too_many_redirects``."""
    user_agent: str = "mmpretrain/0.1 (+image-text shard preparation)"


class _Failure(SampleError):
    """One attempt failed; `fetch` decides from `retryable` whether to try again."""

    def __init__(self, reason: str, detail: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(reason, detail)
        self.retryable = retryable
        self.retry_after = retry_after


def thread_session() -> requests.Session:
    """This thread's Session: requests does not promise that a Session is thread-safe
    (psf/requests#2766), and one per thread still reuses connections within the thread."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        # A session that lives for millions of URLs would otherwise keep every host's cookies.
        session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        adapter = _DeadlineAdapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.session = session
    return session


def fetch(url: str, options: FetchOptions, session: requests.Session | None = None) -> bytes:
    """Download one URL's body or raise SampleError. A `session` of your own gets the deadline as a
    verdict (a late attempt is ``http_timeout``) but is cut off on time only if it mounts
    `_DeadlineAdapter`, as `thread_session` does."""
    session = thread_session() if session is None else session
    attempt = 0
    while True:
        try:
            return _get(url, options, session)
        except _Failure as failure:
            if not failure.retryable or attempt >= options.retries:
                tries = f" ({attempt + 1} attempts)" if attempt else ""
                raise SampleError(failure.reason, failure.detail + tries) from None
            delay = _delay(options, attempt, failure.retry_after)
            if delay > 0:
                _sleep(delay)
            attempt += 1


def _delay(options: FetchOptions, attempt: int, retry_after: float | None) -> float:
    if options.backoff <= 0:
        return 0.0
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP_S)
    return options.backoff * 2**attempt


def _check_url(url: str, origin: str) -> None:
    try:
        parts = urlsplit(url) if isinstance(url, str) else None  # a manifest's empty cell is NaN
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        where = "" if url == origin else f" (redirected from {origin})"
        raise _Failure("invalid_url", f"not an http(s) URL: {url!r}{where}")


def _get(url: str, options: FetchOptions, session: requests.Session) -> bytes:
    """One attempt under one deadline. An attempt that outlived it is ``http_timeout`` whatever it
    ended with: the watchdog's shutdown shows up as a connection error, or as a body that ends early
    yet looks complete (no Content-Length, the connection closed)."""
    with _attempt(options.timeout) as attempt:
        try:
            body = _follow(url, options, session, attempt)
        except _Failure as failure:
            if attempt.finish():
                raise _timed_out(url, options) from failure
            raise
        if attempt.finish():
            raise _timed_out(url, options)
        return body


def _timed_out(url: str, options: FetchOptions) -> _Failure:
    return _Failure("http_timeout", f"GET {url} -> no full response within {options.timeout:g} s", True)


def _follow(url: str, options: FetchOptions, session: requests.Session, attempt: _Attempt) -> bytes:
    """Follow up to max_redirects hops by hand (so the limit is per call, not a setting of a shared
    Session), then read the body."""
    origin = url
    _check_url(url, origin)
    for _ in range(options.max_redirects + 1):
        response = _send(session, url, options, attempt)
        with response:
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECTS or not location:
                return _read_body(url, response, options)
            try:
                url = urljoin(url, location)
            except ValueError:
                url = location  # unparseable; _check_url rejects it
            _check_url(url, origin)
    raise _Failure("too_many_redirects", f"GET {origin} -> more than {options.max_redirects} redirects")


def _send(session: requests.Session, url: str, options: FetchOptions, attempt: _Attempt) -> requests.Response:
    headers = {"User-Agent": options.user_agent}
    # requests' own per-read timeout stays as a second guard (and the only one for a session without
    # _DeadlineAdapter); the time left is at most options.timeout.
    timeout = min(options.timeout, attempt.remaining())
    if timeout <= 0:  # a redirect hop after the deadline
        raise _timed_out(url, options)
    try:
        return session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False)
    except requests.RequestException as error:
        raise _failure_from(error, url) from error
    except (ValueError, UnicodeError) as error:  # http.client rejects e.g. control characters
        raise _Failure("invalid_url", f"GET {url!r} -> {error}") from error


def _read_body(url: str, response: requests.Response, options: FetchOptions) -> bytes:
    status = response.status_code
    line = f"GET {url} -> {status} {response.reason}"
    if status >= 300:
        retryable = status == 429 or status >= 500
        retry_after = _retry_after(response) if status in (429, 503) else None
        raise _Failure(f"http_{status}", line, retryable, retry_after)
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > options.max_bytes:
        raise _Failure("too_large", f"{line}, Content-Length {length} > max_bytes {options.max_bytes}")
    content_type = response.headers.get("Content-Type", "")
    if _clearly_not_image(content_type):
        raise _Failure("not_an_image", f"{line}, Content-Type {content_type}")
    chunks, size = [], 0
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            chunks.append(chunk)
            size += len(chunk)
            if size > options.max_bytes:
                raise _Failure("too_large", f"{line}, body passed max_bytes {options.max_bytes}")
    except requests.RequestException as error:
        raise _failure_from(error, url) from error
    if size == 0:
        raise _Failure("empty_body", f"{line}, 0 bytes")
    return b"".join(chunks)


def _clearly_not_image(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    if not media or media.startswith("image/"):
        return False
    return media.startswith("text/") or media in _PAGE_TYPES or media.endswith(("+json", "+xml"))


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds; the HTTP-date form is ignored (backoff applies instead)."""
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _failure_from(error: requests.RequestException, url: str) -> _Failure:
    name = type(error).__name__
    text = " ".join(str(error).split())[:300]
    # A read timeout while streaming the body surfaces as ConnectionError(ReadTimeoutError).
    inner = error.args[0] if error.args else None
    if isinstance(error, requests.Timeout) or isinstance(inner, ReadTimeoutError):
        return _Failure("http_timeout", f"GET {url} -> timed out ({name})", retryable=True)
    if isinstance(error, _BAD_URL_ERRORS):
        return _Failure("invalid_url", f"GET {url!r} -> {name}: {text}")
    retryable = not isinstance(error, _PERMANENT_ERRORS)
    return _Failure("connection_error", f"GET {url} -> {name}: {text}", retryable)


# ---- the per-attempt deadline ------------------------------------------------------------------------


class _Attempt:
    """One attempt's deadline and the sockets it uses. Every socket is registered as a dup()ed file
    descriptor the attempt owns: shutdown(2) acts on the connection behind any of its descriptors,
    the dup stays valid while urllib3 closes or TLS-wraps (detaches) its own socket object, and no
    fd number closed elsewhere and reused by another download can ever be shut down by mistake."""

    def __init__(self, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.lock = threading.Lock()
        self.watched: list[tuple[HTTPConnection, socket.socket]] = []
        self.done = self.expired = False

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, conn: HTTPConnection, sock: socket.socket) -> None:
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except OSError:
            return  # closed already: nothing left to cut off
        with self.lock:
            self.watched.append((conn, dup))
            if self.expired:  # the deadline passed before this socket existed
                _cut(dup)

    def expire(self) -> None:
        """Called by the watchdog at the deadline; a no-op once the attempt finished."""
        with self.lock:
            if not self.done:
                self.expired = True
                for _, dup in self.watched:
                    _cut(dup)

    def finish(self) -> bool:
        """End the attempt (idempotent); True if it ran past its deadline. Its connections are then
        closed, so a shut-down socket never goes back to the pool for the next URL."""
        with self.lock:
            if not self.done:
                self.done = True
                self.expired = self.expired or time.monotonic() >= self.deadline
                for conn, dup in self.watched:
                    if self.expired:
                        conn.close()
                    dup.close()
                self.watched.clear()
            return self.expired


def _cut(sock: socket.socket) -> None:
    # close() does not wake a recv() blocked in another thread on Linux; shutdown() does.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (any more)


class _Watchdog:
    """The one thread per process that expires attempts in deadline order. Finished attempts stay in
    the heap until their deadline comes (so it holds about URLs-per-second x timeout entries)."""

    def __init__(self):
        self.cond = threading.Condition()
        self.heap: list[tuple[float, int, _Attempt]] = []
        self.order = itertools.count()
        self.thread: threading.Thread | None = None

    def add(self, attempt: _Attempt) -> None:
        with self.cond:
            heapq.heappush(self.heap, (attempt.deadline, next(self.order), attempt))
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="fetch-deadline", daemon=True)
                self.thread.start()
            elif self.heap[0][2] is attempt:
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.heap or self.heap[0][0] > time.monotonic():
                    self.cond.wait(self.heap[0][0] - time.monotonic() if self.heap else None)
                attempt = heapq.heappop(self.heap)[2]
            attempt.expire()


_WATCHDOG = _Watchdog()
# A forked child has the parent's heap but not its thread (and maybe a held lock): start afresh.
os.register_at_fork(after_in_child=_WATCHDOG.__init__)


@contextmanager
def _attempt(timeout: float) -> Iterator[_Attempt]:
    """The attempt this thread's connections register their sockets with, until the block ends."""
    attempt = _Attempt(timeout)
    _WATCHDOG.add(attempt)
    _local.attempt = attempt
    try:
        yield attempt
    finally:
        _local.attempt = None
        attempt.finish()


class _Watched:
    """Registers the socket with this thread's attempt when it connects, and again on each request,
    since a kept-alive connection from the pool never connects again."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(self, sock)
        return sock

    def request(self, *args, **kwargs) -> None:
        if self.sock is not None:
            _watch(self, self.sock)
        super().request(*args, **kwargs)


def _watch(conn: HTTPConnection, sock: socket.socket) -> None:
    attempt = getattr(_local, "attempt", None)
    if attempt is not None:  # None: the session is used outside fetch()
        attempt.watch(conn, sock)


class _HTTPConnection(_Watched, HTTPConnection):
    pass


class _HTTPSConnection(_Watched, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with pools of `_Watched` connections; pools are made lazily, so swapping
    the pool classes after the manager is built is enough. SOCKS proxies keep their own classes."""

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:
            manager.pool_classes_by_scheme = _POOLS
        return manager

"""Download image URLs for `prepare` (the img2dataset step): one URL's bytes with bounded retries,
size and redirect limits, and an in-order thread-pool map over an iterator too long to hold.

Every per-URL failure is a SampleError with a stable reason id (``http_404``, ``http_timeout``,
``too_many_redirects``, ``too_large``, ``not_an_image``, ``connection_error``, ``empty_body``,
``invalid_url``), so a 404-heavy URL list shows up as counts in stats.json instead of looking like a
hang."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from mmpretrain.errors import SampleError

T = TypeVar("T")
R = TypeVar("R")

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
    """Seconds, for the connect and for each read (not for the whole body)."""
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
        _local.session = session
    return session


def fetch(url: str, options: FetchOptions, session: requests.Session | None = None) -> bytes:
    """Download one URL's body or raise SampleError."""
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
    """One attempt: follow up to max_redirects hops by hand (so the limit is per call, not a
    setting of a shared Session), then read the body."""
    origin = url
    _check_url(url, origin)
    for _ in range(options.max_redirects + 1):
        response = _send(session, url, options)
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


def _send(session: requests.Session, url: str, options: FetchOptions) -> requests.Response:
    headers = {"User-Agent": options.user_agent}
    try:
        return session.get(url, headers=headers, timeout=options.timeout, stream=True, allow_redirects=False)
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


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None
) -> Iterator[R]:
    """Apply fn to items on a thread pool, yielding results IN INPUT ORDER, keeping at most `window`
    (default 4*threads) items in flight so a 100M-line iterator is never materialised. Exceptions from
    fn propagate at the item's position (callers wrap fn so per-item failures become values)."""
    window = 4 * threads if window is None else window
    if threads < 1 or window < 1:
        raise ValueError(f"ordered_map needs threads >= 1 and window >= 1, got {threads} and {window}")
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) == window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # Consumer stopped early or fn raised: drop what has not started; the pool's exit
            # waits only for the few items already running.
            for future in pending:
                future.cancel()

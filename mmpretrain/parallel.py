"""Work on a thread pool with results in input order and a bounded look-ahead: prepare's URL
downloads (prepare.engines) and storage's reads of many small objects (storage.read_many)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int, window: int | None = None, name: str = "ordered-map"
) -> Iterator[R]:
    """Apply fn to items on a thread pool, yielding results IN INPUT ORDER, keeping at most `window`
    (default 4*threads) items running or finished-and-waiting, so a 100M-line iterator is never
    materialised and memory is about `window` results. A slow item holds back only the yield: the
    threads go on with later items until the window is full. Exceptions from fn propagate at the
    item's position (callers wrap fn so per-item failures become values)."""
    window = 4 * threads if window is None else window
    if threads < 1 or window < 1:
        raise ValueError(f"ordered_map needs threads >= 1 and window >= 1, got {threads} and {window}")
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix=name) as pool:
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

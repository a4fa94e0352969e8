"""ordered_map: results in input order from a thread pool, with a bounded look-ahead (prepare's
downloads, storage.read_many)."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from mmpretrain.parallel import ordered_map


def test_ordered_map_keeps_input_order_when_later_items_finish_first():
    finished = []

    def slow_first(i):
        time.sleep((12 - i) * 0.02)
        finished.append(i)
        return i * i

    assert list(ordered_map(slow_first, range(12), threads=4)) == [i * i for i in range(12)]
    assert finished != sorted(finished)  # later items really did finish first
    assert finished.index(3) < finished.index(0)


def test_ordered_map_bounds_items_in_flight_and_pulled_ahead():
    lock = threading.Lock()
    running = max_running = pulled = 0

    def source():
        nonlocal pulled
        for i in range(20):
            pulled += 1
            yield i

    def work(i):
        nonlocal running, max_running
        with lock:
            running += 1
            max_running = max(max_running, running)
        time.sleep(0.03)
        with lock:
            running -= 1
        return i

    ahead = []
    for k, value in enumerate(ordered_map(work, source(), threads=8, window=3)):
        assert value == k
        ahead.append(pulled - k)
    assert max_running == 3  # 8 threads, but the window holds 3
    assert max(ahead) == 3


def test_ordered_map_default_window_is_four_per_thread():
    pulled = []
    gen = ordered_map(lambda i: i, (pulled.append(i) or i for i in itertools.count()), threads=2)
    assert next(gen) == 0
    assert len(pulled) == 8
    gen.close()


def test_ordered_map_on_endless_iterator_stops_when_consumer_stops():
    pulled = []
    gen = ordered_map(lambda i: -i, (pulled.append(i) or i for i in itertools.count()), threads=2, window=4)
    assert list(itertools.islice(gen, 5)) == [0, -1, -2, -3, -4]
    gen.close()
    assert len(pulled) <= 5 + 4


def test_ordered_map_raises_at_the_failing_items_position():
    def work(i):
        if i == 3:
            raise ValueError("item 3")
        return i

    seen = []
    with pytest.raises(ValueError, match="item 3"):
        for value in ordered_map(work, range(10), threads=2, window=4):
            seen.append(value)
    assert seen == [0, 1, 2]


def test_ordered_map_empty_input_and_bad_arguments():
    assert list(ordered_map(lambda i: i, [], threads=3)) == []
    with pytest.raises(ValueError):
        list(ordered_map(lambda i: i, [1], threads=0))

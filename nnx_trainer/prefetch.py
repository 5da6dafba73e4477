"""Device prefetch: the next batches placed on the device while the current step runs."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

__all__ = ["DevicePrefetcher"]


class DevicePrefetcher:
    """Keeps ``size`` batches on device ahead of the step that consumes them.

    Each item is ``(device_batch, data_state)`` where ``data_state`` is the host
    iterator's state right after that batch was read (``None`` unless
    ``record_state``: the Trainer resumes from its step counters instead), so a consumer
    can resume exactly at the next batch even though later batches were already
    prefetched. Time blocked on the host pipeline is
    summed in ``wait_seconds``.
    """

    def __init__(
        self,
        iterator: Iterator[Mapping[str, np.ndarray]],
        put: Callable[[Mapping[str, np.ndarray]], Any],
        size: int = 2,
        limit: int | None = None,
        record_state: bool = False,
    ) -> None:
        self._iterator = iterator
        self._record_state = record_state and hasattr(iterator, "get_state")
        self._put = put
        self._size = max(1, size)
        self._remaining = limit
        self._queue: collections.deque = collections.deque()
        self.wait_seconds = 0.0

    def _fill(self) -> None:
        while len(self._queue) < self._size and (self._remaining is None or self._remaining > 0):
            start = time.perf_counter()
            try:
                host_batch = next(self._iterator)
            except StopIteration:
                self._remaining = 0
                break
            finally:
                self.wait_seconds += time.perf_counter() - start
            state = self._iterator.get_state() if self._record_state else None
            self._queue.append((self._put(host_batch), state))
            if self._remaining is not None:
                self._remaining -= 1

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if not self._queue:
            self._fill()
            if not self._queue:
                raise StopIteration
        item = self._queue.popleft()
        # Refill after handing out: the caller dispatches its (async) step first, then
        # the next host batch is read and copied while the device computes.
        return item

    def refill(self) -> None:
        """Read and place batches until ``size`` are queued; call right after dispatching a step."""
        self._fill()

    def close(self) -> None:
        """Stop the host pipeline (worker processes, threads) now, not at garbage collection."""
        self._queue.clear()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> DevicePrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

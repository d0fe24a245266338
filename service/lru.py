"""A least-recently-used cache bounded by a total size, counting its hits and misses."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class SizedLRU(Generic[V]):
    """Values under string keys, at most ``capacity`` units of ``size(value)`` in all (default: one
    unit per value); the least recently used go first, and a value larger than the whole cache is
    not kept. Safe to share between threads (the HTTP layer's event loop and thread pool, the engine's
    worker): each call holds a lock."""

    def __init__(self, capacity: int, size: Callable[[V], int] = lambda _value: 1):
        self.capacity = capacity
        self._size = size
        self._items: OrderedDict[str, V] = OrderedDict()
        self.total = 0  # the sizes of the values kept
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: V) -> None:
        size = self._size(value)
        if size > self.capacity:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.total -= self._size(old)
            self._items[key] = value
            self.total += size
            while self.total > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self.total -= self._size(evicted)
